//! Decoding an AdmissionReview request and encoding the answer.
//!
//! Everything that comes over the wire is checked here, with an HTTP status and a message a
//! person can act on: a body that is not JSON, nested deeper than serde_json's recursion limit
//! (128), of another apiVersion or kind, without a request, or without the object the
//! operation needs. Nothing here panics on any input.

use kube::core::DynamicObject;
use kube::core::Status;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::error::Category;

use super::engine::{Decision, Operation};

/// Largest body accepted: an UPDATE carries two objects, each at most etcd's 1.5 MiB, plus the
/// envelope.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// The only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A request we cannot answer with an AdmissionReview: an HTTP status and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadReview {
    /// 400, 413 or 415.
    pub status: u16,
    /// What is wrong, for the caller.
    pub message: String,
}

impl BadReview {
    fn bad(message: impl Into<String>) -> Self {
        BadReview {
            status: 400,
            message: message.into(),
        }
    }

    /// The body is larger than [`MAX_BODY`].
    pub fn too_large() -> Self {
        BadReview {
            status: 413,
            message: format!(
                "the body is larger than {} MiB, the most an AdmissionReview can be",
                MAX_BODY / (1024 * 1024)
            ),
        }
    }
}

/// Checks the `Content-Type` header (absent is accepted).
pub fn check_content_type(content_type: Option<&str>) -> Result<(), BadReview> {
    match content_type {
        None => Ok(()),
        Some(ct)
            if ct
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")) =>
        {
            Ok(())
        }
        Some(ct) => Err(BadReview {
            status: 415,
            message: format!("content type {ct:?}: an AdmissionReview is sent as application/json"),
        }),
    }
}

/// The admission request in `body`, or why it is not one.
pub fn decode(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, BadReview> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BadReview::bad(
            "empty body: expected an AdmissionReview (admission.k8s.io/v1) as JSON",
        ));
    }
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        BadReview::bad(if text.contains("recursion limit") {
            format!("the body is JSON nested deeper than 128 levels ({text})")
        } else {
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => {
                    format!("the body is not valid JSON: {text}")
                }
                Category::Data => format!("the body is not an AdmissionReview: {text}"),
            }
        })
    })?;
    if review.types.api_version != API_VERSION {
        return Err(BadReview::bad(format!(
            "apiVersion {:?}: this webhook serves {API_VERSION} only (set admissionReviewVersions: [v1])",
            review.types.api_version
        )));
    }
    if review.types.kind != "AdmissionReview" {
        return Err(BadReview::bad(format!(
            "kind {:?}: expected AdmissionReview",
            review.types.kind
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| BadReview::bad("the AdmissionReview has no request"))?;
    let op = operation(&request);
    if matches!(op, Operation::Create | Operation::Update) && request.object.is_none() {
        return Err(BadReview::bad(format!(
            "the {} request {} has no object",
            op.as_str(),
            request.uid
        )));
    }
    if op == Operation::Update && request.old_object.is_none() {
        return Err(BadReview::bad(format!(
            "the UPDATE request {} has no oldObject",
            request.uid
        )));
    }
    Ok(request)
}

/// The operation of `request`.
pub fn operation(request: &AdmissionRequest<DynamicObject>) -> Operation {
    use kube::core::admission::Operation as K;
    match request.operation {
        K::Create => Operation::Create,
        K::Update => Operation::Update,
        K::Delete => Operation::Delete,
        K::Connect => Operation::Connect,
    }
}

/// The AdmissionReview answering `request` with `decision`.
pub fn respond(
    request: &AdmissionRequest<DynamicObject>,
    decision: &Decision,
) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::from(request);
    if !decision.allowed {
        response.allowed = false;
        response.result = Status::failure(&decision.message, "Forbidden").with_code(403);
    }
    if !decision.warnings.is_empty() {
        response.warnings = Some(decision.warnings.clone());
    }
    response.into_review()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review(op: &str, object: Value, old: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "todo.example.com", "version": "v1", "kind": "Todo"},
                "resource": {"group": "todo.example.com", "version": "v1", "resource": "todos"},
                "name": "first",
                "namespace": "shop",
                "operation": op,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": old,
                "dryRun": false,
            }
        })
    }

    fn todo() -> Value {
        json!({"apiVersion": "todo.example.com/v1", "kind": "Todo",
               "metadata": {"name": "first", "namespace": "shop"}, "spec": {"code": "A-1"}})
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn a_valid_review_decodes() {
        let r = decode(&bytes(&review("CREATE", todo(), Value::Null))).unwrap();
        assert_eq!(operation(&r), Operation::Create);
        assert_eq!(r.name, "first");
        assert_eq!(r.object.unwrap().data["spec"]["code"], "A-1");
        let r = decode(&bytes(&review("DELETE", Value::Null, todo()))).unwrap();
        assert_eq!(operation(&r), Operation::Delete);
    }

    #[test]
    fn bad_reviews_table() {
        let good = bytes(&review("CREATE", todo(), Value::Null));
        let mut wrong_version = review("CREATE", todo(), Value::Null);
        wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let mut wrong_kind = review("CREATE", todo(), Value::Null);
        wrong_kind["kind"] = json!("TokenReview");
        let mut no_request = review("CREATE", todo(), Value::Null);
        no_request.as_object_mut().unwrap().remove("request");
        let mut bad_op = review("CREATE", todo(), Value::Null);
        bad_op["request"]["operation"] = json!("EXPLODE");
        let mut no_uid = review("CREATE", todo(), Value::Null);
        no_uid["request"].as_object_mut().unwrap().remove("uid");
        let deep_in_object = |open: &str, close: &str| {
            let nested = format!("{}1{}", open.repeat(200), close.repeat(200));
            let text = String::from_utf8(good.clone()).unwrap();
            text.replace(r#""code":"A-1""#, &format!(r#""code":{nested}"#))
                .into_bytes()
        };
        let unclosed_in_request = {
            let text = String::from_utf8(good.clone()).unwrap();
            text.replace(
                r#""code":"A-1""#,
                &format!(r#""code":{}"#, "[".repeat(100_000)),
            )
            .into_bytes()
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", b"".to_vec(), "empty body"),
            ("whitespace", b"  \n".to_vec(), "empty body"),
            ("not JSON", b"hello".to_vec(), "not valid JSON"),
            (
                "truncated",
                good[..good.len() / 2].to_vec(),
                "not valid JSON",
            ),
            ("binary", vec![0xff, 0xfe, 0x00, 0x01], "not valid JSON"),
            (
                "a JSON string",
                b"\"AdmissionReview\"".to_vec(),
                "not an AdmissionReview",
            ),
            (
                "deeply nested arrays (not even an object)",
                "[".repeat(100_000).into_bytes(),
                "not an AdmissionReview",
            ),
            (
                "deeply nested objects",
                "{\"a\":".repeat(100_000).into_bytes(),
                "nested deeper than 128",
            ),
            (
                "objects deep inside the object",
                deep_in_object("{\"a\":", "}"),
                "nested deeper than 128",
            ),
            (
                "arrays deep inside the object",
                deep_in_object("[", "]"),
                "nested deeper than 128",
            ),
            (
                "unclosed arrays inside the request",
                unclosed_in_request,
                "nested deeper than 128",
            ),
            (
                "wrong apiVersion",
                bytes(&wrong_version),
                "this webhook serves admission.k8s.io/v1 only",
            ),
            ("wrong kind", bytes(&wrong_kind), "expected AdmissionReview"),
            ("no request", bytes(&no_request), "has no request"),
            (
                "unknown operation",
                bytes(&bad_op),
                "not an AdmissionReview",
            ),
            ("no uid", bytes(&no_uid), "missing field `uid`"),
            (
                "create without object",
                bytes(&review("CREATE", Value::Null, Value::Null)),
                "CREATE request",
            ),
            (
                "update without object",
                bytes(&review("UPDATE", Value::Null, todo())),
                "has no object",
            ),
            (
                "update without oldObject",
                bytes(&review("UPDATE", todo(), Value::Null)),
                "has no oldObject",
            ),
            (
                "object is not an object",
                bytes(&review("CREATE", json!(["x"]), Value::Null)),
                "not an AdmissionReview",
            ),
        ];
        for (what, body, expected) in cases {
            match decode(&body) {
                Ok(_) => panic!("{what}: decoded"),
                Err(e) => {
                    assert_eq!(e.status, 400, "{what}");
                    assert!(e.message.contains(expected), "{what}: {}", e.message);
                }
            }
        }
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(None).is_ok());
        assert!(check_content_type(Some("application/json")).is_ok());
        assert!(check_content_type(Some("application/json; charset=utf-8")).is_ok());
        assert_eq!(
            check_content_type(Some("text/plain")).unwrap_err().status,
            415
        );
        assert_eq!(BadReview::too_large().status, 413);
    }

    #[test]
    fn answers_carry_the_uid_the_message_and_warnings() {
        let r = decode(&bytes(&review("CREATE", todo(), Value::Null))).unwrap();
        let denied = Decision {
            allowed: false,
            rule: Some("unique-code".into()),
            message: "rule unique-code: no".into(),
            warnings: vec!["careful".into()],
        };
        let out = serde_json::to_value(respond(&r, &denied)).unwrap();
        assert_eq!(out["apiVersion"], API_VERSION);
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["message"], "rule unique-code: no");
        assert_eq!(out["response"]["status"]["code"], 403);
        assert_eq!(out["response"]["warnings"], json!(["careful"]));
        let out = serde_json::to_value(respond(&r, &Decision::allow(vec![]))).unwrap();
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("warnings").is_none());
    }
}
