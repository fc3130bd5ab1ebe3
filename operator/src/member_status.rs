//! What members report about themselves: the operator reads each ready member's `/status`
//! (admin port) during a reconcile, with the client and document type of `mailnode-api`.
//!
//! Why the operator polls instead of members writing annotations on their pods: members run
//! without a service account token (`automountServiceAccountToken: false`) and need no RBAC at
//! all, so a compromised relay cannot write to the API server; the operator already reconciles
//! every cluster periodically and on pod changes, so polling adds one small HTTP request per
//! ready member per reconcile, with a short timeout so a hung member cannot stall the
//! controller. The NetworkPolicy already admits the admin port (probes and metrics use it).
//!
//! How a member is reached is a function in the reconcile [`Context`](crate::reconcile::Context)
//! ([`MemberAddress`]): the pod IP and admin port in a cluster, a loopback address in tests
//! (fake nodes have pod IPs nothing listens on).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use mailnode_api::admin::AdminClient;
use mailnode_api::status::StatusReport;

use crate::crd::ADMIN_PORT;

/// Where a member's admin port is; None: the member is not asked (no pod IP yet).
pub type MemberAddress = Arc<dyn Fn(&Pod) -> Option<SocketAddr> + Send + Sync>;

/// The admin port at the pod's IP.
pub fn pod_admin_address() -> MemberAddress {
    Arc::new(|pod: &Pod| {
        let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
        Some(SocketAddr::new(ip, u16::try_from(ADMIN_PORT).ok()?))
    })
}

/// Read `GET /status` from `addr`, giving up after `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<StatusReport, String> {
    AdminClient::new(addr, timeout)
        .status()
        .await
        .map_err(|e| e.to_string())
}
