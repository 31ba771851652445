//! Client address networks (`10.0.0.0/24`, `::1/128`, or a bare address) for `[nbd]
//! allowed_clients`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a network could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetworkError {
    #[error(
        "{0:?} is not an IP address or network (expected e.g. \"10.0.0.0/24\" or \"::1/128\")"
    )]
    Address(String),
    #[error("{text:?}: prefix length must be a number from 0 to {max}")]
    PrefixLen { text: String, max: u8 },
    #[error("{text:?}: address bits beyond the /{prefix_len} prefix are set (did you mean {suggested}?)")]
    HostBits {
        text: String,
        prefix_len: u8,
        suggested: String,
    },
}

impl IpNetwork {
    /// Whether `ip` is in this network. An IPv4 client reaching an IPv6 socket
    /// (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(self.prefix_len) & (u32::from(net) ^ u32::from(ip)) == 0
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(self.prefix_len) & (u128::from(net) ^ u128::from(ip)) == 0
            }
            _ => false,
        }
    }
}

fn mask32(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn mask128(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl FromStr for IpNetwork {
    type Err = IpNetworkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .trim()
            .parse()
            .map_err(|_| IpNetworkError::Address(text.to_string()))?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_text {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| IpNetworkError::PrefixLen {
                    text: text.to_string(),
                    max,
                })?,
        };
        let net = IpNetwork { addr, prefix_len };
        let masked = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix_len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix_len)).into()),
        };
        if masked != addr {
            return Err(IpNetworkError::HostBits {
                text: text.to_string(),
                prefix_len,
                suggested: IpNetwork {
                    addr: masked,
                    prefix_len,
                }
                .to_string(),
            });
        }
        Ok(net)
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_matches() {
        assert!(net("10.0.0.0/24").contains(ip("10.0.0.255")));
        assert!(!net("10.0.0.0/24").contains(ip("10.0.1.0")));
        assert!(net("0.0.0.0/0").contains(ip("192.168.1.1")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")));
        assert!(net("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(net("::1/128").contains(ip("::1")));
        assert!(net("fd00::/8").contains(ip("fd12::5")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        // An IPv4 client on a dual-stack socket.
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert_eq!(net("10.0.0.0/24").to_string(), "10.0.0.0/24");
    }

    #[test]
    fn refuses_what_is_not_a_network() {
        for bad in [
            "",
            "10.0.0/24",
            "host.lan",
            "10.0.0.0/33",
            "::1/129",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad}");
        }
        let e = "10.0.0.1/24".parse::<IpNetwork>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/24"), "{e}");
    }
}
