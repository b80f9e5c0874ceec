//! `KAB_HOSTS_FILE`: a hosts-format file (`<ip> <name> [names…]`) that maps Service DNS names
//! such as `todo-broker.shop.svc` to local addresses. The local workload runtime writes it; when
//! it is set, the broker and notify URLs are resolved through it before DNS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

/// Environment variable naming the hosts file.
pub const HOSTS_FILE_ENV: &str = "KAB_HOSTS_FILE";

/// Name → address, from a hosts file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hosts {
    names: HashMap<String, IpAddr>,
}

impl Hosts {
    /// Parses hosts-format text; `#` starts a comment, lines whose first field is not an
    /// address are skipped. The first line naming a host wins (as in `/etc/hosts`).
    pub fn parse(text: &str) -> Self {
        let mut names = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in fields {
                names.entry(normalize(name)).or_insert(ip);
            }
        }
        Self { names }
    }

    /// Reads the file named by [`HOSTS_FILE_ENV`], if set.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        match std::env::var_os(HOSTS_FILE_ENV) {
            Some(path) if !path.is_empty() => Ok(Some(Self::load(Path::new(&path))?)),
            _ => Ok(None),
        }
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading hosts file {}: {e}", path.display()))?;
        Ok(Self::parse(&text))
    }

    /// The address of `name` (case-insensitive, trailing dot ignored).
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        self.names.get(&normalize(name)).copied()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A URL whose host was replaced by its address from a hosts file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The URL to connect to.
    pub url: String,
    /// `host[:port]` of the original URL (the HTTP `Host` header to send).
    pub authority: String,
}

/// Replaces the host of `scheme://[user@]host[:port][/…]` by its address in `hosts`; `None`
/// when the URL has no such host or the host is not in the file.
pub fn resolve_url(url: &str, hosts: &Hosts) -> Option<Resolved> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (Some(user), hostport),
        None => (None, authority),
    };
    if hostport.starts_with('[') {
        return None; // an IPv6 literal needs no resolving
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (hostport, None),
    };
    let ip = hosts.lookup(host)?;
    let ip = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut resolved = format!("{scheme}://");
    if let Some(user) = userinfo {
        resolved.push_str(user);
        resolved.push('@');
    }
    resolved.push_str(&ip);
    if let Some(port) = port {
        resolved.push(':');
        resolved.push_str(port);
    }
    resolved.push_str(tail);
    Some(Resolved {
        url: resolved,
        authority: hostport.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# written by the local workload runtime
127.0.0.1   localhost
127.0.0.12  todo-broker.shop.svc todo-broker.shop.svc.cluster.local   # the broker
not-an-ip   ignored.example
127.0.0.13  Todo-API.shop.svc
127.0.0.99  todo-broker.shop.svc
::1         v6.shop.svc
";

    #[test]
    fn parses_hosts_format() {
        let hosts = Hosts::parse(FILE);
        assert_eq!(
            hosts.lookup("todo-broker.shop.svc"),
            Some("127.0.0.12".parse().unwrap()),
            "the first line naming a host wins"
        );
        assert_eq!(
            hosts.lookup("todo-broker.shop.svc.cluster.local."),
            Some("127.0.0.12".parse().unwrap())
        );
        assert_eq!(
            hosts.lookup("todo-api.shop.svc"),
            Some("127.0.0.13".parse().unwrap())
        );
        assert_eq!(hosts.lookup("ignored.example"), None);
        assert_eq!(hosts.lookup("elsewhere.svc"), None);
    }

    #[test]
    fn resolves_urls_keeping_port_path_and_user() {
        let hosts = Hosts::parse(FILE);
        assert_eq!(
            resolve_url("nats://todo-broker.shop.svc:4222", &hosts),
            Some(Resolved {
                url: "nats://127.0.0.12:4222".into(),
                authority: "todo-broker.shop.svc:4222".into()
            })
        );
        assert_eq!(
            resolve_url("http://todo-api.shop.svc/notifications?x=1", &hosts),
            Some(Resolved {
                url: "http://127.0.0.13/notifications?x=1".into(),
                authority: "todo-api.shop.svc".into()
            })
        );
        assert_eq!(
            resolve_url("nats://me:secret@todo-broker.shop.svc:4222", &hosts).map(|r| r.url),
            Some("nats://me:secret@127.0.0.12:4222".into())
        );
        assert_eq!(
            resolve_url("http://v6.shop.svc:8080/x", &hosts).map(|r| r.url),
            Some("http://[::1]:8080/x".into())
        );
        assert_eq!(resolve_url("nats://other.svc:4222", &hosts), None);
        assert_eq!(resolve_url("not a url", &hosts), None);
    }
}
