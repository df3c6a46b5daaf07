//! Session identifiers and the key that groups a client's handshakes.

use std::fmt;
use std::net::IpAddr;

/// Bytes of CSPRNG output in a session identifier (128 bits, as RFC 6265 §8
/// advises at least for a session cookie).
pub const SESSION_ID_LEN: usize = 16;

/// An opaque session identifier: 128 bits from the operating system's
/// CSPRNG and nothing else (no state is encoded in it). HTTP carries it as
/// the session cookie.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId([u8; SESSION_ID_LEN]);

impl SessionId {
    /// A fresh identifier from the operating system's CSPRNG.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; SESSION_ID_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parse the textual form (32 hex digits).
    pub fn parse(value: &str) -> Option<Self> {
        let mut bytes = [0u8; SESSION_ID_LEN];
        hex::decode_to_slice(value, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// The textual form: 32 lower-case hex digits.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits: enough to correlate log lines, not enough to
    /// take over the session.
    pub fn prefix(self) -> String {
        hex::encode(self.0.get(..4).unwrap_or_default())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({}…)", self.prefix())
    }
}

/// Who a handshake is counted against for the per-client cap: an IPv4
/// address, or the /64 prefix of an IPv6 address (one host commonly holds a
/// whole /64, so counting single IPv6 addresses would cap nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 address (IPv4-mapped IPv6 addresses count as IPv4).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix([u8; 8]),
}

/// The address as logs show it: `192.0.2.7`, or `2001:db8:0:1::/64`.
impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            ClientKey::V6Prefix(p) => {
                let mut o = [0u8; 16];
                if let Some(head) = o.get_mut(..8) {
                    head.copy_from_slice(p);
                }
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
        }
    }
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(o.get(..8).unwrap_or(&[0; 8]));
                    ClientKey::V6Prefix(prefix)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_display_as_addresses() {
        let v4 = ClientKey::from("192.0.2.7".parse::<IpAddr>().expect("v4"));
        assert_eq!(v4.to_string(), "192.0.2.7");
        let mapped = ClientKey::from("::ffff:192.0.2.7".parse::<IpAddr>().expect("mapped"));
        assert_eq!(mapped.to_string(), "192.0.2.7");
        let v6 = ClientKey::from("2001:db8:0:1:aaaa::9".parse::<IpAddr>().expect("v6"));
        assert_eq!(v6.to_string(), "2001:db8:0:1::/64");
    }

    #[test]
    fn ids_are_random_and_round_trip_without_printing_themselves() {
        let a = SessionId::random().expect("random");
        assert_ne!(a, SessionId::random().expect("random"));
        assert_eq!(SessionId::parse(&a.to_hex()), Some(a));
        assert_eq!(SessionId::parse("zz"), None);
        assert_eq!(SessionId::parse(&"0".repeat(33)), None);
        assert!(!format!("{a:?}").contains(&a.to_hex()));
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(ClientKey::from(a), ClientKey::from(b));
        assert_ne!(ClientKey::from(a), ClientKey::from(c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("ip");
        assert_eq!(ClientKey::from(mapped), ClientKey::V4([127, 0, 0, 2]));
    }
}
