//! What a listener changes in the mail it accepts (`listeners[].senderRewrites`,
//! `listeners[].removeReceived`), for internal devices that send as `root@scanner01` or whose
//! Received headers name internal hosts.
//!
//! - Sender rewriting works as Postfix's `sender_canonical_maps`: the first rule whose `from`
//!   matches the envelope sender rewrites it, and the same rules rewrite the addresses of the
//!   originator headers (`From`, `Sender`, `Resent-From`, `Resent-Sender`). `Reply-To` and
//!   the recipients' headers are left as they are. The null sender (bounces) is never
//!   rewritten. Relay policy and rate limits see the address the client sent; routing,
//!   delivery and bounces use the rewritten one.
//! - Removing Received headers drops those the message arrived with, except the ones written
//!   by a mailnode (which say `(mailnode)`), so that hop counting still stops a loop through
//!   this cluster; the member's own Received header then names neither the client's address
//!   nor its HELO name.
//!
//! [`address`] matches and rewrites one address; [`header`] edits a header section. Both are
//! pure; the DATA and BDAT readers apply them to the header section while it is in memory.

pub mod address;
pub mod header;

pub use address::SenderRewriter;
pub use header::{HeaderEdit, MAX_HEADER_SECTION};
