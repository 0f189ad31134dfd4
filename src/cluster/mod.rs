//! Several hosts: the controller, the node agents and what they share.
//! Everything between processes is mutual TLS under one cluster CA.

pub mod tls;
