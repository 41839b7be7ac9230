//! What connects members: the site's PKI ([`pki`]: the CA, member, admin and serving
//! credentials, join tokens) and the QUIC transport between members ([`transport`]:
//! raft messages, snapshot streams, joins).
//!
//! Owns certificates and connections; must not touch the store or raft state except
//! through the handler the member gives the transport.

pub mod pki;
pub mod transport;
