//! The outbound allow-list of a pod: the annotation `brink.dev/allowed-outbound-hosts`,
//! a comma-separated list of `host`, `host:port`, `*.domain[:port]` or `*`. A guest may make
//! outbound HTTP requests only to what its pod lists; with no annotation, none at all.

use std::fmt;

/// The annotation that grants outbound HTTP.
pub const ALLOWED_OUTBOUND_HOSTS: &str = "brink.dev/allowed-outbound-hosts";

/// One entry of the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// `host` or `host:port` (any port when none is given).
    Exact { host: String, port: Option<u16> },
    /// `*.domain` or `*.domain:port`: any subdomain of `domain` (not `domain` itself).
    Subdomains { domain: String, port: Option<u16> },
}

impl HostPattern {
    /// Whether a request to `host:port` is allowed by this entry.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        match self {
            HostPattern::Any => true,
            HostPattern::Exact { host: h, port: p } => *h == host && port_ok(p),
            HostPattern::Subdomains { domain, port: p } => {
                host.len() > domain.len() + 1
                    && host.ends_with(domain.as_str())
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                    && port_ok(p)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = |p: &Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
        match self {
            HostPattern::Any => write!(f, "*"),
            HostPattern::Exact { host, port: p } => write!(f, "{host}{}", port(p)),
            HostPattern::Subdomains { domain, port: p } => write!(f, "*.{domain}{}", port(p)),
        }
    }
}

/// Parses the annotation's value; an empty value allows nothing.
pub fn parse_allowed_hosts(value: &str) -> Result<Vec<HostPattern>, String> {
    let mut patterns = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            patterns.push(HostPattern::Any);
            continue;
        }
        if entry.contains("://") || entry.contains('/') {
            return Err(format!(
                "{entry:?}: give host or host:port, without scheme or path"
            ));
        }
        let (host, port) = split_host_port(entry)?;
        let host = host.to_ascii_lowercase();
        if let Some(domain) = host.strip_prefix("*.") {
            if !valid_host(domain) {
                return Err(format!("{entry:?}: invalid domain"));
            }
            patterns.push(HostPattern::Subdomains {
                domain: domain.to_string(),
                port,
            });
        } else if valid_host(&host) {
            patterns.push(HostPattern::Exact { host, port });
        } else {
            return Err(format!("{entry:?}: invalid host"));
        }
    }
    Ok(patterns)
}

fn split_host_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = || format!("{entry:?}: invalid port");
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{entry:?}: unclosed '['"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad_port())?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(bad_port()),
        };
    }
    match entry.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => {
            let port: u16 = p.parse().map_err(|_| bad_port())?;
            if port == 0 {
                return Err(bad_port());
            }
            Ok((host, Some(port)))
        }
        Some(_) => Ok((entry, None)), // a bare IPv6 address
        None => Ok((entry, None)),
    }
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_what_they_say() {
        let list =
            parse_allowed_hosts("api.example.com, 127.0.0.1:8080, *.svc.local:443, [::1]:9000")
                .expect("valid");
        let allowed = |h: &str, p: u16| list.iter().any(|x| x.allows(h, p));
        assert!(allowed("api.example.com", 443));
        assert!(allowed("API.example.com", 80));
        assert!(!allowed("evil.api.example.com", 443));
        assert!(allowed("127.0.0.1", 8080));
        assert!(!allowed("127.0.0.1", 8081));
        assert!(allowed("a.svc.local", 443));
        assert!(!allowed("svc.local", 443));
        assert!(!allowed("a.svc.local", 80));
        assert!(!allowed("xsvc.local", 443));
        assert!(allowed("[::1]", 9000));
        assert!(parse_allowed_hosts("").expect("empty").is_empty());
        assert!(parse_allowed_hosts("*").expect("any")[0].allows("anything", 1));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "http://x",
            "x/y",
            "host:",
            "host:99999",
            "host:0",
            "-bad-",
            "*.",
            "[::1",
            "a..b",
            "h st",
        ] {
            assert!(parse_allowed_hosts(bad).is_err(), "{bad:?}");
        }
    }
}
