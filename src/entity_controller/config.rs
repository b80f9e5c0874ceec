//! The entity controller's view of `stack.json` (rendered by [`crate::render::stack_config`]),
//! checked once at start: a controller that cannot publish correctly refuses to run.

use std::path::{Path, PathBuf};

use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;

use crate::api::{BrokerMode, JetStreamStorage};

/// Why `stack.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not the JSON the operator renders.
    #[error("{path} is not a valid stack configuration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A field has a value the controller cannot work with.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The stack configuration, as far as the entity controller uses it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StackConfig {
    /// The stack the controller belongs to.
    pub stack: StackRef,
    /// The entity it watches.
    pub entity: EntityConfig,
    /// Subjects, notify callback, leader Lease.
    pub controller: ControllerConfig,
    /// Where changes go.
    pub broker: BrokerConfig,
}

/// Name and namespace of the stack; the controller watches entities in that namespace only.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct StackRef {
    pub name: String,
    pub namespace: String,
}

/// The entity's API.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntityConfig {
    pub group: String,
    pub kind: String,
    pub plural: String,
    #[serde(default)]
    pub singular: String,
    #[serde(default)]
    pub versions: Vec<String>,
    /// The version the controller watches and names in event sources.
    #[serde(default)]
    pub storage_version: Option<String>,
}

/// `controller` of `stack.json`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ControllerConfig {
    /// First token of every subject: `<prefix>.<namespace>.<plural>.<event>`.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// Optional HTTP callback.
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
    /// Lease the replicas elect their leader with.
    #[serde(default)]
    pub lease_name: Option<String>,
}

/// The HTTP callback that receives every change as a CloudEvent.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotifyConfig {
    pub url: String,
    /// Timeout of one attempt.
    #[serde(default = "default_notify_timeout")]
    pub timeout_seconds: u64,
}

/// `broker` of `stack.json`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerConfig {
    pub mode: BrokerMode,
    /// `nats://host:port` (Managed: the stack's Service; External: the user's URL).
    #[serde(default)]
    pub url: Option<String>,
    /// NATS credentials (`.creds`) of an external broker.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// JetStream storage of a managed broker (None for External: File is used).
    #[serde(default)]
    pub storage: Option<JetStreamStorage>,
}

fn default_prefix() -> String {
    "kab".to_owned()
}

fn default_notify_timeout() -> u64 {
    5
}

impl StackConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: StackConfig =
            serde_json::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config
            .check()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let token = |field: &'static str, value: &str| {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if ok {
                Ok(())
            } else {
                Err((
                    field,
                    format!("{value:?} cannot be a NATS subject token (letters, digits, '-', '_')"),
                ))
            }
        };
        token("controller.subjectPrefix", &self.controller.subject_prefix)?;
        token("stack.namespace", &self.stack.namespace)?;
        token("entity.plural", &self.entity.plural)?;
        for (field, value) in [
            ("stack.name", &self.stack.name),
            ("entity.group", &self.entity.group),
            ("entity.kind", &self.entity.kind),
        ] {
            if value.is_empty() {
                return Err((field, "must not be empty".to_owned()));
            }
        }
        if self
            .entity
            .storage_version
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            return Err((
                "entity.storageVersion",
                "exactly one version must be the storage version".to_owned(),
            ));
        }
        match (self.broker.mode, self.broker.url.as_deref()) {
            (BrokerMode::None, _) => {}
            (_, None | Some("")) => {
                return Err((
                    "broker.url",
                    format!("required when broker.mode is {:?}", self.broker.mode),
                ));
            }
            (_, Some(_)) => {}
        }
        if let Some(notify) = &self.controller.notify
            && !(notify.url.starts_with("http://") || notify.url.starts_with("https://"))
        {
            return Err((
                "controller.notify.url",
                format!("{:?} is not an http:// or https:// URL", notify.url),
            ));
        }
        Ok(())
    }

    /// The version the controller watches (the storage version).
    pub fn version(&self) -> &str {
        self.entity.storage_version.as_deref().unwrap_or_default()
    }

    /// `<group>/<version>`.
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.entity.group, self.version())
    }

    /// The entity's API resource, for a dynamic `Api`.
    pub fn api_resource(&self) -> ApiResource {
        let gvk = GroupVersionKind::gvk(&self.entity.group, self.version(), &self.entity.kind);
        ApiResource::from_gvk_with_plural(&gvk, &self.entity.plural)
    }

    /// Whether changes go to a broker (Managed or External).
    pub fn publishes(&self) -> bool {
        self.broker.mode != BrokerMode::None
    }

    /// The Lease of leader election (`<stack>-controller-leader` unless configured).
    pub fn lease_name(&self) -> String {
        self.controller
            .lease_name
            .clone()
            .unwrap_or_else(|| format!("{}-controller-leader", self.stack.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KabStack;

    fn rendered(stack_yaml: &str) -> String {
        let stack: KabStack = serde_saphyr::from_str(stack_yaml).unwrap();
        serde_json::to_string(&crate::render::stack_config(&stack)).unwrap()
    }

    const TODO: &str = r#"
apiVersion: kab.dev/v1alpha1
kind: KabStack
metadata: {name: todo, namespace: shop}
spec:
  entity:
    group: todo.example.com
    kind: Todo
    versions: [{name: v1, schema: {type: object}}]
  controller: {notify: {url: "http://todo-api.shop.svc/notifications"}}
"#;

    #[test]
    fn reads_what_the_operator_renders() {
        let config = StackConfig::parse(Path::new("stack.json"), &rendered(TODO)).unwrap();
        assert_eq!(config.stack.namespace, "shop");
        assert_eq!(config.api_version(), "todo.example.com/v1");
        assert_eq!(config.entity.plural, "todos");
        assert_eq!(config.controller.subject_prefix, "kab");
        assert_eq!(config.lease_name(), "todo-controller-leader");
        assert_eq!(
            config.broker.url.as_deref(),
            Some("nats://todo-broker.shop.svc:4222")
        );
        assert_eq!(config.broker.storage, Some(JetStreamStorage::File));
        assert_eq!(
            config.controller.notify,
            Some(NotifyConfig {
                url: "http://todo-api.shop.svc/notifications".into(),
                timeout_seconds: 5
            })
        );
        let ar = config.api_resource();
        assert_eq!(
            (ar.api_version.as_str(), ar.plural.as_str()),
            ("todo.example.com/v1", "todos")
        );
        assert!(config.publishes());
    }

    #[test]
    fn no_broker_needs_no_url() {
        let yaml = format!("{TODO}  broker: {{mode: None}}\n");
        let config = StackConfig::parse(Path::new("stack.json"), &rendered(&yaml)).unwrap();
        assert!(!config.publishes());
        assert_eq!(config.broker.url, None);
    }

    #[test]
    fn bad_values_are_named() {
        let mut value: serde_json::Value = serde_json::from_str(&rendered(TODO)).unwrap();
        value["broker"]["url"] = serde_json::Value::Null;
        let err = StackConfig::parse(Path::new("/etc/kab/stack.json"), &value.to_string())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/kab/stack.json: broker.url: required when broker.mode is Managed"
        );

        let mut value: serde_json::Value = serde_json::from_str(&rendered(TODO)).unwrap();
        value["controller"]["subjectPrefix"] = "a.b".into();
        let err = StackConfig::parse(Path::new("s.json"), &value.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.subjectPrefix"), "{err}");

        let err = StackConfig::parse(Path::new("s.json"), "{}")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("s.json is not a valid stack configuration"),
            "{err}"
        );
    }
}
