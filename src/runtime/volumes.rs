//! Pod volumes as local directories, projected the way the kubelet does: the files live in a
//! timestamped directory, `..data` is a symlink to it, and each key is a symlink through `..data`.
//! An update writes a new directory and swaps `..data` atomically with a rename.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one volume lives locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVolume {
    /// Volume name in the pod spec.
    pub name: String,
    /// Local directory.
    pub dir: PathBuf,
    /// What it projects.
    pub source: Source,
}

/// The source of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A ConfigMap (namespace/name, items, optional).
    ConfigMap {
        name: String,
        items: Vec<(String, String)>,
        optional: bool,
    },
    /// A Secret.
    Secret {
        name: String,
        items: Vec<(String, String)>,
        optional: bool,
    },
    /// A directory that lives as long as the pod.
    EmptyDir,
    /// A directory that outlives the pod (per claim).
    Claim,
    /// Something else (e.g. the projected ServiceAccount token): an empty directory.
    Other,
}

/// The local volumes of a pod. Claims live in `claims_dir/<ns>/<claim>` so they survive restarts.
pub fn plan(pod: &Pod, pod_dir: &Path, claims_dir: &Path) -> Vec<LocalVolume> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.volumes
        .iter()
        .flatten()
        .map(|v| {
            let items = |items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
                items
                    .iter()
                    .flatten()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect::<Vec<_>>()
            };
            let (source, dir) = if let Some(cm) = &v.config_map {
                (
                    Source::ConfigMap {
                        name: cm.name.clone(),
                        items: items(&cm.items),
                        optional: cm.optional.unwrap_or(false),
                    },
                    pod_dir.join("volumes").join(&v.name),
                )
            } else if let Some(s) = &v.secret {
                (
                    Source::Secret {
                        name: s.secret_name.clone().unwrap_or_default(),
                        items: items(&s.items),
                        optional: s.optional.unwrap_or(false),
                    },
                    pod_dir.join("volumes").join(&v.name),
                )
            } else if v.empty_dir.is_some() {
                (Source::EmptyDir, pod_dir.join("volumes").join(&v.name))
            } else if let Some(c) = &v.persistent_volume_claim {
                (Source::Claim, claims_dir.join(&ns).join(&c.claim_name))
            } else {
                (Source::Other, pod_dir.join("volumes").join(&v.name))
            };
            LocalVolume {
                name: v.name.clone(),
                dir,
                source,
            }
        })
        .collect()
}

/// The files a ConfigMap or Secret volume holds now: `(relative path, bytes)`; `None` when the
/// object is missing.
pub fn files(
    source: &Source,
    namespace: &str,
    config_maps: &std::collections::HashMap<String, ConfigMap>,
    secrets: &std::collections::HashMap<String, Secret>,
) -> Option<BTreeMap<String, Vec<u8>>> {
    type Projection<'a> = (BTreeMap<String, Vec<u8>>, &'a Vec<(String, String)>);
    let (data, items): Projection<'_> = match source {
        Source::ConfigMap { name, items, .. } => {
            let cm = config_maps.get(&format!("{namespace}/{name}"))?;
            let mut d: BTreeMap<String, Vec<u8>> = cm
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect();
            d.extend(
                cm.binary_data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone())),
            );
            (d, items)
        }
        Source::Secret { name, items, .. } => {
            let s = secrets.get(&format!("{namespace}/{name}"))?;
            let d = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            (d, items)
        }
        _ => return Some(BTreeMap::new()),
    };
    if items.is_empty() {
        return Some(data);
    }
    Some(
        items
            .iter()
            .filter_map(|(key, path)| data.get(key).map(|v| (path.clone(), v.clone())))
            .collect(),
    )
}

/// Writes `files` into `dir` kubelet-style, unless they are already what `..data` holds.
pub fn project(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    generation: u64,
) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data_link = dir.join("..data");
    if let Ok(current) = std::fs::read_link(&data_link) {
        let current_dir = dir.join(&current);
        let same = files
            .iter()
            .all(|(k, v)| std::fs::read(current_dir.join(k)).is_ok_and(|c| &c == v))
            && std::fs::read_dir(&current_dir)
                .map(|r| r.count())
                .unwrap_or(0)
                == files.len();
        if same {
            return Ok(false);
        }
    }
    let stamp = format!("..{}_{generation}", std::process::id());
    let new_dir = dir.join(&stamp);
    let _ = std::fs::remove_dir_all(&new_dir);
    std::fs::create_dir_all(&new_dir)?;
    for (k, v) in files {
        let path = new_dir.join(k);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, v)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    let old = std::fs::read_link(&data_link).ok();
    std::fs::rename(&tmp, &data_link)?;
    for k in files.keys() {
        let top = k.split('/').next().unwrap_or(k);
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

/// Rewrites a path-like value that starts with one of the mount paths to its local directory
/// (longest mount path first; also after `=` as in `--flag=/path`).
pub fn remap(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (prefix, path) = match value.split_once('=') {
        Some((flag, rest)) if flag.starts_with('-') && rest.starts_with('/') => {
            (format!("{flag}="), rest)
        }
        _ => (String::new(), value),
    };
    let mut sorted: Vec<&(String, PathBuf)> = mounts.iter().collect();
    sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    for (mount, local) in sorted {
        let mount = mount.trim_end_matches('/');
        if path == mount {
            return format!("{prefix}{}", local.display());
        }
        if let Some(rest) = path.strip_prefix(mount)
            && rest.starts_with('/')
        {
            return format!("{prefix}{}{rest}", local.display());
        }
    }
    value.to_string()
}

/// Rewrites in-container paths inside a configuration file's text: every occurrence of a mount
/// path that stands as a path (followed by `/`, a quote, whitespace or the end).
pub fn remap_text(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut sorted: Vec<&(String, PathBuf)> = mounts.iter().collect();
    sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let bytes = text.as_bytes();
    'outer: while i < text.len() {
        let before_ok = i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'"' | b'\'' | b':' | b'=' | b'\n'
            );
        if before_ok && bytes[i] == b'/' {
            for (mount, local) in &sorted {
                let mount = mount.trim_end_matches('/');
                if text[i..].starts_with(mount) {
                    let end = i + mount.len();
                    let after_ok = end == text.len()
                        || matches!(
                            bytes[end],
                            b'/' | b' ' | b'\t' | b'"' | b'\'' | b'\n' | b'\r' | b',' | b'}'
                        );
                    if after_ok {
                        out.push_str(&local.display().to_string());
                        i = end;
                        continue 'outer;
                    }
                }
            }
        }
        let ch = text[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn remap_text_rewrites_paths_only() {
        let mounts = vec![(
            "/data".to_string(),
            PathBuf::from("/local/claims/shop/data-0"),
        )];
        let conf = "jetstream {\n  store_dir: /data\n}\nother: /database\nq: \"/data/x\"\n";
        assert_eq!(
            remap_text(conf, &mounts),
            "jetstream {\n  store_dir: /local/claims/shop/data-0\n}\nother: /database\nq: \"/local/claims/shop/data-0/x\"\n"
        );
    }

    use super::*;

    #[test]
    fn remap_takes_the_longest_mount() {
        let mounts = vec![
            ("/etc/kab".to_string(), PathBuf::from("/p/volumes/config")),
            ("/etc/kab/tls".to_string(), PathBuf::from("/p/volumes/tls")),
        ];
        assert_eq!(
            remap("/etc/kab/stack.json", &mounts),
            "/p/volumes/config/stack.json"
        );
        assert_eq!(remap("/etc/kab/tls", &mounts), "/p/volumes/tls");
        assert_eq!(
            remap("--cert=/etc/kab/tls/tls.crt", &mounts),
            "--cert=/p/volumes/tls/tls.crt"
        );
        assert_eq!(remap("/etc/kabby", &mounts), "/etc/kabby");
        assert_eq!(remap("webhook", &mounts), "webhook");
    }

    #[test]
    fn projection_swaps_data_atomically_and_follows_updates() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = BTreeMap::from([("tls.crt".to_string(), b"one".to_vec())]);
        assert!(project(dir.path(), &v1, 1).unwrap());
        assert_eq!(std::fs::read(dir.path().join("tls.crt")).unwrap(), b"one");
        assert!(
            !project(dir.path(), &v1, 2).unwrap(),
            "unchanged data is not rewritten"
        );
        let v2 = BTreeMap::from([("tls.crt".to_string(), b"two".to_vec())]);
        assert!(project(dir.path(), &v2, 3).unwrap());
        assert_eq!(std::fs::read(dir.path().join("tls.crt")).unwrap(), b"two");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            entries.len(),
            3,
            "..data, one timestamped dir and the key link: {entries:?}"
        );
    }
}
