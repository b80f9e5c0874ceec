//! The admission probe: proof that the API server → webhook path works, not merely that the
//! webhook Deployment is available.
//!
//! The operator sends a server-side **dry-run** create of a probe entity: schema-valid (the API
//! server validates the schema before it calls validating webhooks, so the object is the minimal
//! instance of the entity's schema) and annotated `kab.dev/admission-probe: <nonce>`. The stack's
//! webhook denies every dry-run probe object with [`DENIAL_MARKER`]; seeing that denial means the
//! registration, the Service, the certificate and the webhook process all work. Nothing is ever
//! persisted (dry run, and denied anyway).

use kube::core::{ApiResource, DynamicObject};
use serde_json::{Map, Value, json};

/// Annotation marking a probe object (its value is a nonce, also in the object's name).
pub const PROBE_ANNOTATION: &str = "kab.dev/admission-probe";

/// What the webhook's denial of a probe says.
pub const DENIAL_MARKER: &str = "kab admission probe";

/// The nonce of a probe object, if `object` is one.
pub fn nonce_of(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/annotations")?
        .get(PROBE_ANNOTATION)?
        .as_str()
}

/// The probe object for an entity: a name and the annotation carrying the nonce, and the minimal
/// instance of the spec schema. Built, not parsed: there is no way for it to fail.
pub fn probe_object(
    resource: &ApiResource,
    namespace: &str,
    spec_schema: &Value,
    nonce: &str,
) -> DynamicObject {
    let mut object = DynamicObject::new(&format!("kab-probe-{nonce}"), resource).within(namespace);
    object.metadata.annotations = Some([(PROBE_ANNOTATION.to_owned(), nonce.to_owned())].into());
    object.data = json!({"spec": minimal_instance(spec_schema)});
    object
}

/// The smallest value the API server accepts for a structural schema: required properties only,
/// `enum`'s first value, a `default` where given, minimum lengths and bounds honoured. Patterns
/// and formats cannot be satisfied in general; such a schema makes the probe inconclusive (the
/// API server refuses the object before the webhook sees it), which the operator reports.
pub fn minimal_instance(schema: &Value) -> Value {
    if let Some(d) = schema.get("default") {
        return d.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(|e| e.as_array())
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let ty = schema
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("object");
    let int = |k: &str| schema.get(k).and_then(|v| v.as_i64());
    let num = |k: &str| schema.get(k).and_then(|v| v.as_f64());
    match ty {
        "string" => {
            let n = int("minLength").unwrap_or(0).clamp(0, 4096) as usize;
            match schema.get("format").and_then(|f| f.as_str()) {
                Some("date-time") => json!("1970-01-01T00:00:00Z"),
                Some("date") => json!("1970-01-01"),
                Some("uuid") => json!("00000000-0000-0000-0000-000000000000"),
                Some("email") => json!("probe@example.com"),
                Some("uri") => json!("https://example.com"),
                _ if schema.get("x-kubernetes-int-or-string").is_some() => json!(0),
                _ => json!("a".repeat(n)),
            }
        }
        "integer" => json!(
            int("minimum")
                .map(
                    |m| if schema.get("exclusiveMinimum") == Some(&json!(true)) {
                        m + 1
                    } else {
                        m
                    }
                )
                .unwrap_or(0)
                .max(int("minimum").unwrap_or(i64::MIN))
        ),
        "number" => json!(num("minimum").unwrap_or(0.0)),
        "boolean" => json!(false),
        "array" => {
            let n = int("minItems").unwrap_or(0).clamp(0, 64) as usize;
            let item = schema
                .get("items")
                .map(minimal_instance)
                .unwrap_or(Value::Null);
            if schema
                .get("x-kubernetes-list-type")
                .and_then(|t| t.as_str())
                == Some("set")
                && n > 1
            {
                // Sets need distinct items; a minimal set of one is all we can build blindly.
                json!([item])
            } else {
                Value::Array(vec![item; n])
            }
        }
        _ => {
            let mut out = Map::new();
            let props = schema.get("properties").and_then(|p| p.as_object());
            for name in schema
                .get("required")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                let Some(name) = name.as_str() else { continue };
                let sub = props
                    .and_then(|p| p.get(name))
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "string"}));
                out.insert(name.to_string(), minimal_instance(&sub));
            }
            let min_props = int("minProperties").unwrap_or(0);
            if (out.len() as i64) < min_props
                && let Some(p) = props
            {
                for (name, sub) in p {
                    if out.len() as i64 >= min_props {
                        break;
                    }
                    out.entry(name.clone())
                        .or_insert_with(|| minimal_instance(sub));
                }
            }
            Value::Object(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_instances_satisfy_required_fields_and_bounds() {
        let schema = json!({"type": "object", "required": ["code", "count", "tags", "kind"],
        "properties": {
            "code": {"type": "string", "minLength": 3},
            "count": {"type": "integer", "minimum": 5},
            "tags": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "kind": {"type": "string", "enum": ["b", "a"]},
            "optional": {"type": "string"},
        }});
        assert_eq!(
            minimal_instance(&schema),
            json!({"code": "aaa", "count": 5, "tags": [""], "kind": "b"})
        );
        assert_eq!(minimal_instance(&json!({"type": "object"})), json!({}));
        assert_eq!(
            minimal_instance(&json!({"type": "string", "format": "date-time"})),
            json!("1970-01-01T00:00:00Z")
        );
        assert_eq!(
            minimal_instance(&json!({"type": "integer", "default": 7})),
            json!(7)
        );
    }

    #[test]
    fn a_probe_object_carries_its_nonce() {
        let todo = kube::core::GroupVersionKind::gvk("todo.example.com", "v1", "Todo");
        let resource = ApiResource::from_gvk_with_plural(&todo, "todos");
        let o = probe_object(
            &resource,
            "shop",
            &json!({"type": "object", "required": ["code"],
            "properties": {"code": {"type": "string"}}}),
            "n0nce",
        );
        // What the webhook receives: the object as JSON.
        let o = serde_json::to_value(&o).unwrap();
        assert_eq!(nonce_of(&o), Some("n0nce"));
        assert_eq!(o["apiVersion"], "todo.example.com/v1");
        assert_eq!(o["kind"], "Todo");
        assert_eq!(o["metadata"]["name"], "kab-probe-n0nce");
        assert_eq!(o["metadata"]["namespace"], "shop");
        assert_eq!(o["spec"], json!({"code": ""}));
    }
}
