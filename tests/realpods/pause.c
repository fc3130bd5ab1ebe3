/* The pause container of the real-pod test nodes (kubelet's pod sandbox): sleeps, reaps children
 * and exits on SIGTERM or SIGINT. Built static with musl-gcc by tests/realpods/cluster.sh. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void reap(int s){(void)s; while (waitpid(-1, 0, WNOHANG) > 0) {}}
static void quit(int s){(void)s; _exit(0);}
int main(void){
  signal(SIGCHLD, reap); signal(SIGTERM, quit); signal(SIGINT, quit);
  for(;;) pause();
}
