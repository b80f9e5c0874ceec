//! What to type next: the lines `kab dev` prints once a stack is up. Pure.

use serde_json::{Map, Value};

use crate::api::{BrokerMode, KabStack};
use crate::render;

/// A sample entity of the stack for `kubectl create -f -`, as YAML lines: every required
/// property of the schema, and up to four scalar ones, with a plausible value.
pub fn sample_entity(stack: &KabStack) -> Vec<String> {
    let entity = &stack.spec.entity;
    let version = entity
        .storage_version()
        .or_else(|| entity.versions.first())
        .map(|v| (v.name.clone(), v.schema.clone()));
    let (version, schema) = version.unwrap_or_else(|| ("v1".into(), Value::Null));
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let singular = entity.singular();
    let mut spec = Map::new();
    for name in &required {
        if let Some(v) = props
            .get(*name)
            .and_then(|p| sample_value(name, p, &singular))
        {
            spec.insert((*name).to_owned(), v);
        }
    }
    for (name, p) in &props {
        if spec.len() >= 4.max(required.len()) {
            break;
        }
        if spec.contains_key(name) {
            continue;
        }
        let scalar = matches!(
            p.get("type").and_then(Value::as_str),
            Some("string" | "integer" | "number" | "boolean")
        );
        if let Some(v) = scalar.then(|| sample_value(name, p, &singular)).flatten() {
            spec.insert(name.clone(), v);
        }
    }
    let flow = |m: &Map<String, Value>| {
        let fields: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}: {}", Value::to_string(v)))
            .collect();
        format!("{{{}}}", fields.join(", "))
    };
    vec![
        format!("apiVersion: {}/{version}", entity.group),
        format!("kind: {}", entity.kind),
        format!("metadata: {{name: {singular}-1}}"),
        format!("spec: {}", flow(&spec)),
    ]
}

fn sample_value(name: &str, schema: &Value, singular: &str) -> Option<Value> {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return Some(first.clone());
    }
    match schema.get("type").and_then(Value::as_str)? {
        "string" => Some(Value::String(format!("{singular}-{name}-1"))),
        "integer" | "number" => Some(Value::from(1)),
        "boolean" => Some(Value::Bool(true)),
        "object" => Some(Value::Object(Map::new())),
        "array" => Some(Value::Array(Vec::new())),
        _ => None,
    }
}

/// What may refuse the sample entity: external rules whose application may not run yet.
pub fn caveats(stack: &KabStack) -> Vec<String> {
    stack
        .spec
        .rules
        .iter()
        .filter_map(|r| {
            let ext = r.external.as_ref().filter(|e| !e.fail_open)?;
            Some(format!(
                "rule {} asks {}: until that application answers, creates are denied naming the rule",
                r.name, ext.url
            ))
        })
        .collect()
}

/// Where entity changes go: the broker subject and URL, or why there are none.
pub fn events(stack: &KabStack) -> String {
    let names = render::names(stack);
    let subject = format!(
        "{}.{}.{}.>",
        stack.spec.controller.subject_prefix,
        names.namespace,
        stack.spec.entity.plural()
    );
    match (stack.spec.broker.mode, render::broker_url(stack)) {
        (BrokerMode::None, _) | (_, None) => {
            "broker.mode is None: entity changes are not published".to_string()
        }
        (mode, Some(url)) => {
            let which = if mode == BrokerMode::Managed {
                "the stack's broker"
            } else {
                "the external broker"
            };
            format!(
                "entity changes are CloudEvents on subject {subject} of {which}: nats sub '{subject}' -s {url} (in the cluster)"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn todo() -> KabStack {
        serde_saphyr::from_str(include_str!("../../examples/todo.yaml")).unwrap()
    }

    #[test]
    fn the_sample_todo_has_its_required_code() {
        assert_eq!(
            sample_entity(&todo()),
            [
                "apiVersion: todo.example.com/v1",
                "kind: Todo",
                "metadata: {name: todo-1}",
                r#"spec: {code: "todo-code-1", message: "todo-message-1"}"#,
            ]
        );
    }

    #[test]
    fn an_external_rule_that_fails_closed_is_a_caveat() {
        let mut s = todo();
        for r in &mut s.spec.rules {
            if let Some(e) = r.external.as_mut() {
                e.fail_open = false;
            }
        }
        assert_eq!(
            caveats(&s),
            [
                "rule app-says-ok asks http://todo-api.shop.svc/validate: until that application answers, creates are denied naming the rule"
            ]
        );
        for r in &mut s.spec.rules {
            if let Some(e) = r.external.as_mut() {
                e.fail_open = true;
            }
        }
        assert!(caveats(&s).is_empty(), "failOpen admits without the app");
    }

    #[test]
    fn events_name_the_subject_and_the_broker() {
        assert_eq!(
            events(&todo()),
            "entity changes are CloudEvents on subject kab.shop.todos.> of the stack's broker: nats sub 'kab.shop.todos.>' -s nats://todo-broker.shop.svc:4222 (in the cluster)"
        );
        let mut none = todo();
        none.spec.broker.mode = BrokerMode::None;
        assert!(events(&none).contains("not published"));
    }
}
