//! Hosts as tools name them, and which IPs are never reachable.
//!
//! Filters that compare strings lose to the many spellings of an address (`2130706433`,
//! `0x7f000001`, `0177.0.0.1`, `127.1`, `[::ffff:127.0.0.1]`), so every host is normalised
//! here first: IP literals in any form libc's `inet_aton` accepts become one [`IpAddr`], names
//! are lower-cased without a trailing dot, and the decision is made on the IP the name
//! resolves to ([`classify_ip`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A normalised host. IPv4-mapped IPv6 literals (`[::ffff:1.2.3.4]`) become the IPv4
/// address they reach, so patterns written for one form hold for the other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower case, no trailing dot, LDH labels (underscores tolerated).
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl Host {
    /// The form patterns match against: a name, or the IP without brackets.
    pub fn match_text(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host {0:?} is not a valid name or IP address")]
    Invalid(String),
    #[error("host {0:?} names the local machine")]
    Localhost(String),
}

/// Most bytes of a DNS name (RFC 1035).
const MAX_NAME: usize = 253;

/// Parses the host part of a CONNECT target or URL authority (brackets allowed around IPv6).
pub fn parse_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| HostError::Invalid(raw.into()))?;
        // A zone id (`fe80::1%eth0`) is a host-local notion: refuse.
        let ip: Ipv6Addr = inner.parse().map_err(|_| HostError::Invalid(raw.into()))?;
        return Ok(Host::Ip(IpAddr::V6(ip).to_canonical()));
    }
    if let Ok(ip) = raw.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(IpAddr::V6(ip).to_canonical()));
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(HostError::Invalid(raw.into()));
    }
    if let Some(ip) = parse_inet_aton(name) {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if !valid_name(name) {
        return Err(HostError::Invalid(raw.into()));
    }
    // A last label of digits only (or hex) would be read as a number by some resolvers.
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) || looks_hex(last) {
        return Err(HostError::Invalid(raw.into()));
    }
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(HostError::Localhost(raw.into()));
    }
    Ok(Host::Name(name.to_string()))
}

fn looks_hex(label: &str) -> bool {
    label.len() > 2 && label.starts_with("0x") && label[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_name(name: &str) -> bool {
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// IPv4 literals the way `inet_aton` reads them: 1 to 4 parts, each decimal, `0x` hex or
/// `0` octal; the last part fills the remaining bytes (`127.1`, `2130706433`).
fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(4);
    for p in &parts {
        nums.push(parse_aton_part(p)?);
    }
    let (last, head) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let rest_bits = 32 - 8 * head.len() as u32;
    if rest_bits < 64 && *last >= (1u64 << rest_bits) {
        return None;
    }
    Some(Ipv4Addr::from((value | last) as u32))
}

fn parse_aton_part(p: &str) -> Option<u64> {
    if p.is_empty() || p.len() > 12 {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x") {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        // "0x" alone is 0 for inet_aton.
        return if radix == 16 { Some(0) } else { None };
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|v| *v <= u32::MAX as u64)
}

/// Why an IP is never reachable through the proxy (unless an operator CIDR allows it), or
/// `None` for a public unicast address. IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms are
/// judged by the IPv4 address they carry.
pub fn classify_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let reason = match o {
        [169, 254, 169, 254] | [169, 254, 170, 2] | [100, 100, 100, 200] => "cloud metadata",
        [0, ..] => "unspecified/this network (0.0.0.0/8)",
        [10, ..] => "private (10.0.0.0/8)",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT (100.64.0.0/10)",
        [127, ..] => "loopback (127.0.0.0/8)",
        [169, 254, ..] => "link-local (169.254.0.0/16)",
        [172, b, ..] if (16..32).contains(&b) => "private (172.16.0.0/12)",
        [192, 0, 0, _] => "IETF protocol assignments (192.0.0.0/24)",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation range",
        [192, 88, 99, _] => "6to4 relay anycast (192.88.99.0/24)",
        [192, 168, ..] => "private (192.168.0.0/16)",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..240).contains(&a) => "multicast (224.0.0.0/4)",
        [255, 255, 255, 255] => "broadcast",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(reason)
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let reason = match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified (::)",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback (::1)",
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] => "cloud metadata (fd00:ec2::254)",
        [a, ..] if a & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        [a, ..] if a & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        [0x2001, 0xdb8, ..] => "documentation (2001:db8::/32)",
        [0x2001, b, ..] if b < 0x200 => "IETF special purpose (2001::/23)",
        [0x0100, 0, 0, 0, ..] => "discard-only (100::/64)",
        [0, 0, 0, 0, 0, 0, _, _] => "IPv4-compatible (::/96)",
        _ => return None,
    };
    Some(reason)
}

/// The IPv4 address an IPv6 address stands for, where one does: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, a, _] if a != 0 => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Some(tail),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_spelling_of_loopback_is_one_ip() {
        for s in [
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "127.1",
            "127.0.1",
            "0x7f.1",
            "127.0.0.1.",
        ] {
            assert_eq!(parse_host(s).unwrap(), Host::Ip(ip("127.0.0.1")), "{s}");
        }
        assert_eq!(
            parse_host("[::ffff:127.0.0.1]").unwrap(),
            Host::Ip(ip("127.0.0.1"))
        );
        assert_eq!(
            parse_host("[::ffff:7f00:1]").unwrap(),
            Host::Ip(ip("127.0.0.1"))
        );
        assert_eq!(parse_host("0").unwrap(), Host::Ip(ip("0.0.0.0")));
        assert!(matches!(
            parse_host("localhost."),
            Err(HostError::Localhost(_))
        ));
        assert!(matches!(
            parse_host("LocalHost"),
            Err(HostError::Localhost(_))
        ));
        assert!(matches!(
            parse_host("a.localhost"),
            Err(HostError::Localhost(_))
        ));
    }

    #[test]
    fn names_are_normalised_and_odd_ones_refused() {
        assert_eq!(
            parse_host("Example.COM.").unwrap(),
            Host::Name("example.com".into())
        );
        for bad in [
            "a..b",
            "-a.com",
            "a b",
            "[::1",
            "1.2.3.4.5",
            "256.1.1.1",
            "x.0x10",
            "x.123",
            "[fe80::1%eth0]",
            "",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn internal_ranges_are_classified() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "ff02::1",
            "169.254.170.2",
        ] {
            assert!(classify_ip(ip(s)).is_some(), "{s} must be denied");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "100.128.0.1",
        ] {
            assert_eq!(classify_ip(ip(s)), None, "{s} is public");
        }
    }
}
