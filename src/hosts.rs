//! `KAB_HOSTS_FILE`: a hosts-format file (`<ip> <name> [names…]`) that maps Service DNS names
//! such as `todo-broker.shop.svc` to local addresses. The local workload runtime writes it; when
//! it is set, the broker, notify and external-rule URLs are resolved through it before DNS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
        match Self::path_from_env() {
            Some(path) => Ok(Some(Self::load(&path)?)),
            None => Ok(None),
        }
    }

    /// The file named by [`HOSTS_FILE_ENV`], if set.
    pub fn path_from_env() -> Option<PathBuf> {
        std::env::var_os(HOSTS_FILE_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
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

/// Resolves `url` through the hosts file at `path`, read now (the runtime adds Services as they
/// appear). A cluster Service name (`….svc`, `….svc.cluster.local`) missing from the file is
/// waited for, up to `patience`; any other name is left to DNS at once.
pub async fn resolve_in_file(url: &str, path: &Path, patience: Duration) -> Option<Resolved> {
    let deadline = Instant::now() + patience;
    let mut warned = false;
    loop {
        let hosts = Hosts::load(path).unwrap_or_default();
        if let Some(resolved) = resolve_url(url, &hosts) {
            return Some(resolved);
        }
        let service = host_of(url).is_some_and(is_service_name);
        if !service || Instant::now() >= deadline {
            return None;
        }
        if !warned {
            tracing::info!(%url, file = %path.display(), "waiting for the Service name in the hosts file");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether `host` is the DNS name of a cluster Service.
pub fn is_service_name(host: &str) -> bool {
    let host = normalize(host);
    host.ends_with(".svc") || host.ends_with(".svc.cluster.local")
}

/// The host of `scheme://[user@]host[:port][/…]`.
pub fn host_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if hostport.starts_with('[') {
        return None;
    }
    Some(hostport.rsplit_once(':').map_or(hostport, |(h, _)| h))
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

    #[test]
    fn service_names_are_recognised() {
        assert_eq!(
            host_of("nats://u:p@todo-broker.shop.svc:4222"),
            Some("todo-broker.shop.svc")
        );
        assert_eq!(host_of("http://api.example.com/x"), Some("api.example.com"));
        assert!(is_service_name("todo-broker.shop.svc"));
        assert!(is_service_name("todo-broker.shop.svc.cluster.local."));
        assert!(!is_service_name("nats.example.com"));
    }

    #[tokio::test]
    async fn a_service_name_is_waited_for_and_other_names_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "127.0.0.1 localhost\n").unwrap();
        let started = Instant::now();
        assert_eq!(
            resolve_in_file(
                "nats://nats.example.com:4222",
                &path,
                Duration::from_secs(5)
            )
            .await,
            None
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no wait for DNS names"
        );

        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::write(&path, "127.0.0.7 todo-broker.shop.svc\n").unwrap();
            })
        };
        let resolved = resolve_in_file(
            "nats://todo-broker.shop.svc:4222",
            &path,
            Duration::from_secs(5),
        )
        .await;
        writer.await.unwrap();
        assert_eq!(
            resolved.map(|r| r.url),
            Some("nats://127.0.0.7:4222".into())
        );
    }
}
