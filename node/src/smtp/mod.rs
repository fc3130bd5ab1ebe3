//! The SMTP protocol, free of I/O: command parser, addresses, DATA decoder, replies, the relay
//! policy a listener applies to clients and recipients, and the session state machine.
//! [`crate::smtp_server`] drives it from a socket.

pub mod address;
pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod reply;
pub mod session;
