//! Kubeconfig rendering (credentials embedded, so the file is self-contained).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Renders a kubeconfig with one cluster, one user and one current context.
/// Certificates and key are embedded as `*-data`.
pub fn render(
    context: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    client_cert_pem: &str,
    client_key_pem: &str,
) -> String {
    let ca = STANDARD.encode(ca_pem);
    let cert = STANDARD.encode(client_cert_pem);
    let key = STANDARD.encode(client_key_pem);
    // Every interpolated value is quoted JSON, which is valid YAML.
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let (context, server, user) = (q(context), q(server), q(user));
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {context}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {context}
  context:
    cluster: {context}
    user: {user}
current-context: {context}
preferences: {{}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::config::Kubeconfig;

    #[test]
    fn renders_a_parseable_kubeconfig() {
        let text = render(
            "kab",
            "https://127.0.0.1:43211",
            "CA PEM",
            "kab-admin",
            "CERT PEM",
            "KEY PEM",
        );
        let kc = Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("kab"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:43211"));
        assert_eq!(
            cluster.certificate_authority_data.as_deref(),
            Some(STANDARD.encode("CA PEM").as_str())
        );
        let auth = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            auth.client_certificate_data.as_deref(),
            Some(STANDARD.encode("CERT PEM").as_str())
        );
        assert_eq!(kc.auth_infos[0].name, "kab-admin");
        let ctx = kc.contexts[0].context.as_ref().unwrap();
        assert_eq!(ctx.cluster, "kab");
        assert_eq!(ctx.user.as_deref(), Some("kab-admin"));
    }

    #[test]
    fn quotes_awkward_names() {
        let text = render(
            "a: b",
            "https://x",
            "",
            "system:serviceaccount:ns:op",
            "",
            "",
        );
        let kc = Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("a: b"));
        assert_eq!(kc.auth_infos[0].name, "system:serviceaccount:ns:op");
    }
}
