"""Sends test mail for kind-config/e2e.sh (Python standard library only).

send.py HOST PORT COUNT PREFIX: sends COUNT messages with subjects PREFIX-1..COUNT to
someone@external.example; exits 0 when every one was accepted, 3 when every one was refused
with a 5xx, 1 otherwise. Prints one line per message."""
import smtplib, sys
host, port, count, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
accepted = refused = 0
for i in range(1, count + 1):
    subject = "%s-%d" % (prefix, i)
    msg = "From: e2e@client.example\r\nTo: someone@external.example\r\nSubject: %s\r\n\r\n%s\r\n" % (subject, subject)
    try:
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.sendmail("e2e@client.example", ["someone@external.example"], msg)
        accepted += 1
        print("accepted", subject, flush=True)
    except smtplib.SMTPRecipientsRefused as e:
        refused += 1
        print("refused", subject, e.recipients, flush=True)
    except smtplib.SMTPResponseException as e:
        if 500 <= e.smtp_code < 600:
            refused += 1
        print("error", subject, e.smtp_code, e.smtp_error, flush=True)
sys.exit(0 if accepted == count else 3 if refused == count else 1)
