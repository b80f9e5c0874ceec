//! The webhook's HTTP routes: `POST /validate` (AdmissionReview v1), and the
//! [health routes](crate::telemetry::health_routes) `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt as _;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionRequest;

use super::engine::{
    Admission, Claims, Decision, Entities, External, Operation, RuleSet, evaluate,
};
use super::metrics::Metrics;
use super::review::{self, BadReview, MAX_BODY};

use crate::admission_probe::{DENIAL_MARKER, PROBE_ANNOTATION};
use crate::telemetry::{Health, health_routes};

/// Bodies over [`MAX_BODY`] are still read, up to this much, so that the client can read the
/// 413 (a server that closes on unread data makes the client's TCP stack drop the answer).
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// How long reading a body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the webhook validates: the entity and the namespace of its stack.
#[derive(Clone, Debug)]
pub struct Scope {
    /// `<namespace>/<name>` of the stack, for messages.
    pub stack: String,
    /// The entity's API group.
    pub group: String,
    /// The entity's kind.
    pub kind: String,
    /// The stack's namespace.
    pub namespace: String,
}

/// Reports why the process is not ready (empty: ready).
pub type Readiness = Arc<dyn Fn() -> Vec<&'static str> + Send + Sync>;

/// Everything a request needs.
pub struct App<E, C, X> {
    /// What is validated.
    pub scope: Scope,
    /// The rules.
    pub rules: RuleSet,
    /// The entity cache.
    pub entities: E,
    /// The unique-value claims.
    pub claims: C,
    /// The business application.
    pub external: X,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness (cache synced, certificate loaded).
    pub readiness: Readiness,
    /// Called before `/metrics` is encoded (to sample gauges).
    pub on_scrape: Arc<dyn Fn() + Send + Sync>,
}

/// The routes.
pub fn router<E, C, X>(app: Arc<App<E, C, X>>) -> Router
where
    E: Entities + Send + Sync + 'static,
    C: Claims + Send + Sync + 'static,
    X: External + Send + Sync + 'static,
{
    let health = health_routes(app.clone());
    Router::new()
        .route("/validate", post(validate::<E, C, X>))
        .with_state(app)
        .merge(health)
}

impl<E, C, X> Health for App<E, C, X>
where
    E: Send + Sync + 'static,
    C: Send + Sync + 'static,
    X: Send + Sync + 'static,
{
    fn not_ready(&self) -> Vec<&'static str> {
        (self.readiness)()
    }

    fn metrics_text(&self) -> String {
        (self.on_scrape)();
        self.metrics.encode()
    }
}

fn refuse(app_metrics: &Metrics, bad: BadReview, started: Instant) -> Response {
    app_metrics.request("", "invalid", None, started.elapsed());
    tracing::info!(status = bad.status, "refused a request: {}", bad.message);
    let status = StatusCode::from_u16(bad.status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", bad.message),
    )
        .into_response()
}

/// Reads at most [`MAX_BODY`]; a larger body is drained (up to [`DRAIN_LIMIT`]) and refused.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, BadReview> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(BadReview::too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(
            declared
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0)
                .min(MAX_BODY),
        );
        let mut total = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BadReview {
                status: 400,
                message: format!("reading the body: {e}"),
            })?;
            total = total.saturating_add(chunk.len());
            if total > DRAIN_LIMIT {
                break;
            }
            if total <= MAX_BODY {
                buf.extend_from_slice(&chunk);
            }
        }
        if total > MAX_BODY {
            Err(BadReview::too_large())
        } else {
            Ok(buf)
        }
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(BadReview {
                status: 408,
                message: format!("the body was not sent within {}s", BODY_TIMEOUT.as_secs()),
            })
        })
}

async fn validate<E, C, X>(
    State(app): State<Arc<App<E, C, X>>>,
    headers: HeaderMap,
    body: Body,
) -> Response
where
    E: Entities + Send + Sync,
    C: Claims + Send + Sync,
    X: External + Send + Sync,
{
    let started = Instant::now();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    if let Err(bad) = review::check_content_type(content_type) {
        return refuse(&app.metrics, bad, started);
    }
    let bytes = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(bad) => return refuse(&app.metrics, bad, started),
    };
    let request = match review::decode(&bytes) {
        Ok(r) => r,
        Err(bad) => return refuse(&app.metrics, bad, started),
    };
    drop(bytes);
    let (decision, result) = app.decide(&request).await;
    let op = review::operation(&request).as_str();
    app.metrics
        .request(op, result, decision.rule.as_deref(), started.elapsed());
    if decision.allowed {
        tracing::debug!(uid = %request.uid, operation = op, name = %request.name, dry_run = request.dry_run, "allowed");
    } else {
        tracing::info!(uid = %request.uid, operation = op, name = %request.name, dry_run = request.dry_run, "denied: {}", decision.message);
    }
    axum::Json(review::respond(&request, &decision)).into_response()
}

impl<E, C, X> App<E, C, X>
where
    E: Entities + Send + Sync,
    C: Claims + Send + Sync,
    X: External + Send + Sync,
{
    /// The decision for `request` and the metric result (`allowed`, `denied`, `skipped`,
    /// `probe`).
    pub async fn decide(
        &self,
        request: &AdmissionRequest<DynamicObject>,
    ) -> (Decision, &'static str) {
        if let Some(why) = self.foreign(request) {
            tracing::warn!(uid = %request.uid, "{why}");
            return (Decision::allow(vec![why]), "skipped");
        }
        let operation = review::operation(request);
        let name = request
            .object
            .as_ref()
            .or(request.old_object.as_ref())
            .and_then(|o| o.metadata.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| request.name.clone());
        if request.dry_run
            && request
                .object
                .as_ref()
                .and_then(|o| o.metadata.annotations.as_ref())
                .is_some_and(|a| a.contains_key(PROBE_ANNOTATION))
        {
            return (
                Decision {
                    allowed: false,
                    rule: None,
                    message: format!(
                        "{DENIAL_MARKER}: the webhook of stack {} is serving",
                        self.scope.stack
                    ),
                    warnings: vec![],
                },
                "probe",
            );
        }
        if name.is_empty() && matches!(operation, Operation::Create | Operation::Update) {
            return (
                Decision {
                    allowed: false,
                    rule: None,
                    message: "the object has no name: cannot enforce the stack's rules".into(),
                    warnings: vec![],
                },
                "denied",
            );
        }
        let admission = Admission {
            operation,
            namespace: request.namespace.as_deref().unwrap_or_default(),
            name: &name,
            object: request.object.as_ref(),
            old_object: request.old_object.as_ref(),
            dry_run: request.dry_run,
        };
        let decision = evaluate(
            &self.rules,
            &admission,
            &self.entities,
            &self.claims,
            &self.external,
        )
        .await;
        let result = if decision.allowed {
            "allowed"
        } else {
            "denied"
        };
        (decision, result)
    }

    /// Why `request` is not ours to judge (another kind, namespace, or a subresource), if so.
    /// Such requests are admitted with a warning: our rules do not speak about them, and the
    /// registration never sends them.
    fn foreign(&self, request: &AdmissionRequest<DynamicObject>) -> Option<String> {
        let s = &self.scope;
        let what = if request.kind.group != s.group || request.kind.kind != s.kind {
            format!("{}/{}", request.kind.group, request.kind.kind)
        } else if request.namespace.as_deref() != Some(s.namespace.as_str()) {
            format!(
                "namespace {}",
                request.namespace.as_deref().unwrap_or("(none)")
            )
        } else if request
            .sub_resource
            .as_deref()
            .is_some_and(|r| !r.is_empty())
        {
            format!(
                "subresource {}",
                request.sub_resource.as_deref().unwrap_or_default()
            )
        } else {
            return None;
        };
        Some(format!(
            "the kab webhook of stack {} validates {}/{} in namespace {} only; {what} was not validated",
            s.stack, s.group, s.kind, s.namespace
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BusinessRule, FieldsRule};
    use crate::webhook::engine::{Claim, ClaimOutcome, ExternalAnswer};
    use axum::http::Request;
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    struct NoEntities;
    impl Entities for NoEntities {
        fn find_holder(&self, _: &str, _: &[String], v: &[Value], _: &str) -> Option<String> {
            (v == [json!("TAKEN")]).then(|| "first".to_owned())
        }
        fn count(&self, _: &str) -> usize {
            0
        }
    }
    struct Free;
    impl Claims for Free {
        type Error = std::convert::Infallible;
        async fn check(&self, _: &Claim) -> Result<ClaimOutcome, Self::Error> {
            Ok(ClaimOutcome::Granted)
        }
        async fn acquire(&self, _: &Claim) -> Result<ClaimOutcome, Self::Error> {
            Ok(ClaimOutcome::Granted)
        }
        async fn release(&self, _: &Claim) {}
    }
    struct Yes;
    impl External for Yes {
        async fn ask(&self, _: &crate::api::ExternalRule, _: &Value) -> ExternalAnswer {
            ExternalAnswer::Allowed { warnings: vec![] }
        }
    }

    fn app(ready: bool) -> Router {
        router(Arc::new(App {
            scope: Scope {
                stack: "shop/todo".into(),
                group: "todo.example.com".into(),
                kind: "Todo".into(),
                namespace: "shop".into(),
            },
            rules: RuleSet {
                rules: vec![BusinessRule {
                    name: "unique-code".into(),
                    unique: Some(FieldsRule {
                        fields: vec!["spec.code".into()],
                    }),
                    immutable: None,
                    max_count: None,
                    external: None,
                }],
                singular: "todo".into(),
                plural: "todos".into(),
            },
            entities: NoEntities,
            claims: Free,
            external: Yes,
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(move || {
                if ready {
                    vec![]
                } else {
                    vec!["entity cache not synced"]
                }
            }),
            on_scrape: Arc::new(|| {}),
        }))
    }

    fn review(code: &str, namespace: &str, annotations: Value, dry_run: bool) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "todo.example.com", "version": "v1", "kind": "Todo"},
                "resource": {"group": "todo.example.com", "version": "v1", "resource": "todos"},
                "name": "second",
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {"apiVersion": "todo.example.com/v1", "kind": "Todo",
                           "metadata": {"name": "second", "namespace": namespace, "annotations": annotations},
                           "spec": {"code": code}},
                "dryRun": dry_run,
            }
        })
    }

    async fn post_body(router: Router, body: Vec<u8>, content_type: &str) -> (u16, String) {
        let response = router
            .oneshot(
                Request::post("/validate")
                    .header("content-type", content_type)
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn post_review(router: Router, v: &Value) -> Value {
        let (status, text) =
            post_body(router, serde_json::to_vec(v).unwrap(), "application/json").await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    #[tokio::test]
    async fn reviews_are_answered() {
        let out = post_review(app(true), &review("A-1", "shop", json!({}), false)).await;
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["uid"], "u-1");

        let out = post_review(app(true), &review("TAKEN", "shop", json!({}), false)).await;
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(
            out["response"]["status"]["message"],
            r#"rule unique-code: spec.code "TAKEN" is already used by todo shop/first"#
        );

        let out = post_review(app(true), &review("TAKEN", "elsewhere", json!({}), false)).await;
        assert_eq!(out["response"]["allowed"], true);
        assert!(
            out["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("namespace elsewhere was not validated")
        );

        let probe = json!({PROBE_ANNOTATION: "x"});
        let out = post_review(app(true), &review("A-1", "shop", probe.clone(), true)).await;
        assert_eq!(out["response"]["allowed"], false);
        assert!(
            out["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with(DENIAL_MARKER)
        );
        // Not a dry run: judged like any other.
        let out = post_review(app(true), &review("A-1", "shop", probe, false)).await;
        assert_eq!(out["response"]["allowed"], true);
    }

    #[tokio::test]
    async fn bad_requests_get_4xx_with_a_message() {
        let good = serde_json::to_vec(&review("A-1", "shop", json!({}), false)).unwrap();
        let (s, text) = post_body(app(true), good[..20].to_vec(), "application/json").await;
        assert_eq!(s, 400);
        assert!(text.contains("not valid JSON"), "{text}");
        let (s, _) = post_body(app(true), good.clone(), "text/plain").await;
        assert_eq!(s, 415);
        let (s, text) =
            post_body(app(true), vec![b' '; 10 * 1024 * 1024], "application/json").await;
        assert_eq!(s, 413, "{text}");
        let (s, text) = post_body(
            app(true),
            String::from_utf8(good.clone())
                .unwrap()
                .replace(
                    r#""code":"A-1""#,
                    &format!(r#""code":{}"#, "[".repeat(100_000)),
                )
                .into_bytes(),
            "application/json",
        )
        .await;
        assert_eq!(s, 400);
        assert!(text.contains("nested deeper"), "{text}");
        let r = app(true)
            .oneshot(Request::get("/validate").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        use crate::telemetry::fetch as get;
        assert_eq!(get(app(false), "/healthz").await.0, 200);
        assert_eq!(
            get(app(false), "/readyz").await,
            (503, "not ready: entity cache not synced".to_owned())
        );
        assert_eq!(get(app(true), "/readyz").await.0, 200);
        let router = app(true);
        post_review(router.clone(), &review("TAKEN", "shop", json!({}), false)).await;
        let (status, text) = get(router, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            text.contains(
                r#"kab_webhook_requests_total{operation="CREATE",result="denied",rule="unique-code"} 1"#
            ),
            "{text}"
        );
    }
}
