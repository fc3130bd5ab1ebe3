//! The words `kubectl describe mailcluster` shows: the reasons of the status conditions and of
//! the events the operator records, and the phases of a removed member's queue volume. One enum
//! each, so that a reason is spelled in one place and the status code matches on values.

use std::fmt;

/// The reason of a condition (`Ready`, `Progressing`, `Degraded`) or of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Ready: every member is ready and runs the current configuration.
    AllMembersReady,
    /// Ready, Progressing: the StatefulSet does not exist yet.
    Creating,
    /// Ready: some members are not ready (or not yet created).
    MembersNotReady,
    /// Ready: ready members run a configuration other than the current one.
    ConfigMismatch,
    /// Ready: members run different versions.
    VersionMismatch,
    /// Ready: members cannot reach each other on the peer channel.
    PeersUnreachable,
    /// Progressing: members are being added or removed.
    Scaling,
    /// Progressing: members are being updated to the current spec.
    RollingOut,
    /// Progressing: members load a changed configuration without a restart.
    Reloading,
    /// Progressing: nothing is under way.
    Stable,
    /// Ready, Progressing, Degraded: the spec cannot be turned into a cluster.
    InvalidSpec,
    /// Degraded: nothing needs attention.
    AsExpected,
    /// Degraded, event: a reconcile failed; it is retried with backoff.
    ReconcileFailed,
    /// Degraded: `spec.tls.issuerRef` is set but cert-manager is not installed.
    CertificateCRDMissing,
    /// Degraded: DNS is enabled but external-dns's DNSEndpoint kind is not installed.
    DNSEndpointCRDMissing,
    /// Degraded: the Job draining a removed member's volume failed.
    DrainFailed,
    /// Degraded: a member refuses its configuration file (it keeps the previous one).
    ConfigRefused,
    /// Degraded: a smarthost credentials Secret is missing or lacks `username`/`password`.
    SmarthostSecretInvalid,
    /// Degraded: a DKIM key Secret is missing or lacks the key it should hold.
    DkimSecretInvalid,
    /// Event: objects were created or changed.
    Applied,
    /// Event: a new cluster key was added next to the old one.
    RotatingKey,
    /// Event: every member runs with the new cluster key; the old one was dropped.
    KeyRotated,
    /// Event: a Job started to drain a removed member's volume.
    DrainingVolume,
    /// Event: a removed member's volume was drained and deleted.
    VolumeDrained,
}

impl Reason {
    /// The CamelCase word Kubernetes stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllMembersReady => "AllMembersReady",
            Self::Creating => "Creating",
            Self::MembersNotReady => "MembersNotReady",
            Self::ConfigMismatch => "ConfigMismatch",
            Self::VersionMismatch => "VersionMismatch",
            Self::PeersUnreachable => "PeersUnreachable",
            Self::Scaling => "Scaling",
            Self::RollingOut => "RollingOut",
            Self::Reloading => "Reloading",
            Self::Stable => "Stable",
            Self::InvalidSpec => "InvalidSpec",
            Self::AsExpected => "AsExpected",
            Self::ReconcileFailed => "ReconcileFailed",
            Self::CertificateCRDMissing => "CertificateCRDMissing",
            Self::DNSEndpointCRDMissing => "DNSEndpointCRDMissing",
            Self::DrainFailed => "DrainFailed",
            Self::ConfigRefused => "ConfigRefused",
            Self::SmarthostSecretInvalid => "SmarthostSecretInvalid",
            Self::DkimSecretInvalid => "DkimSecretInvalid",
            Self::Applied => "Applied",
            Self::RotatingKey => "RotatingKey",
            Self::KeyRotated => "KeyRotated",
            Self::DrainingVolume => "DrainingVolume",
            Self::VolumeDrained => "VolumeDrained",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
