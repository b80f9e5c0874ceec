//! Printing status trees: an aligned text tree (coloured on a terminal), graphviz, JSON, YAML.
//! Pure: the caller passes `now` and whether to colour.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;

use super::tree::{Node, State, StatusList};

/// Output formats of `kab status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned tree, one line per part and object (coloured on a terminal).
    Text,
    /// The tree as JSON: the stack's root line, or `{"items": [...]}` for several stacks.
    Json,
    /// The tree as YAML.
    Yaml,
    /// A graphviz digraph: `kab status shop/todo -o dot | dot -Tsvg > todo.svg`.
    Dot,
}

/// Whether to colour: stdout is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn use_colour(stdout_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn colour_code(state: State) -> &'static str {
    match state {
        State::Ready => "32",
        State::Progressing => "33",
        State::Degraded => "31",
        State::Failed => "1;31",
        State::Paused => "36",
        State::Deleting => "35",
        State::Disabled | State::Unknown => "2",
    }
}

/// How long, like kubectl prints ages: `45s`, `3m12s`, `12m`, `5h4m`, `20h`, `3d4h`, `89d`, `2y`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        format!("{m}m{}s", s % 60)
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        format!("{d}d{}h", h % 24)
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

/// The label of a line: a part's name, or `Kind namespace/name`.
pub fn label(node: &Node) -> String {
    match node.kind.as_str() {
        "EntityAPI" => "Entity API".into(),
        "EntityController" => "Entity controller".into(),
        "ConfigAndRBAC" => "Config and RBAC".into(),
        "Webhook" => "Webhook".into(),
        "Broker" => match node.facts.get("mode").and_then(|m| m.as_str()) {
            Some(mode) => format!("Broker ({mode})"),
            None => "Broker".into(),
        },
        kind if node.name.is_empty() => kind.to_owned(),
        kind => format!("{kind} {}", node.name),
    }
}

/// What the DETAIL column says: `reason: message` when not Ready, else the message.
pub fn detail(node: &Node) -> String {
    let quiet = matches!(node.state, State::Ready | State::Disabled);
    if quiet || node.reason.is_empty() {
        node.message.clone()
    } else if node.message.is_empty() {
        node.reason.clone()
    } else {
        format!("{}: {}", node.reason, node.message)
    }
}

/// The text tree of every stack, with one header, aligned columns and a blank line between
/// stacks.
pub fn text(trees: &[Node], now: Timestamp, colour: bool) -> String {
    struct Row {
        name: String,
        state: State,
        age: String,
        detail: String,
        first_of_tree: bool,
    }
    let mut rows = Vec::new();
    for tree in trees {
        let mut prefixes: Vec<String> = Vec::new();
        collect(tree, "", "", &mut prefixes);
        for (i, ((_, node), prefix)) in tree.lines().into_iter().zip(prefixes).enumerate() {
            rows.push(Row {
                name: format!("{prefix}{}", label(node)),
                state: node.state,
                age: node
                    .since
                    .as_ref()
                    .map(|t| human_duration(now.as_second() - t.0.as_second()))
                    .unwrap_or_default(),
                detail: detail(node),
                first_of_tree: i == 0,
            });
        }
    }
    let width = |s: &str| s.chars().count();
    let name_w = rows
        .iter()
        .map(|r| width(&r.name))
        .max()
        .unwrap_or(0)
        .max(4);
    let state_w = rows
        .iter()
        .map(|r| r.state.as_str().len())
        .max()
        .unwrap_or(0)
        .max(5);
    let age_w = rows.iter().map(|r| r.age.len()).max().unwrap_or(0).max(3);

    let mut out = String::new();
    let header = format!(
        "{:name_w$}  {:state_w$}  {:>age_w$}  DETAIL",
        "NAME", "STATE", "FOR"
    );
    out.push_str(header.trim_end());
    out.push('\n');
    for (i, r) in rows.iter().enumerate() {
        if r.first_of_tree && i > 0 {
            out.push('\n');
        }
        let pad = name_w - width(&r.name);
        let state = r.state.as_str();
        let state_cell = if colour {
            format!("\x1b[{}m{state}\x1b[0m", colour_code(r.state))
        } else {
            state.to_owned()
        };
        let line = format!(
            "{}{}  {state_cell}{}  {:>age_w$}  {}",
            r.name,
            " ".repeat(pad),
            " ".repeat(state_w - state.len()),
            r.age,
            r.detail
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Tree-drawing prefixes of every line of `node`, depth first.
fn collect(node: &Node, own: &str, below: &str, out: &mut Vec<String>) {
    out.push(own.to_owned());
    let n = node.children.len();
    for (i, c) in node.children.iter().enumerate() {
        let last = i + 1 == n;
        let own = format!("{below}{}", if last { "└─ " } else { "├─ " });
        let below = format!("{below}{}", if last { "   " } else { "│  " });
        collect(c, &own, &below, out);
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fill(state: State) -> &'static str {
    match state {
        State::Ready => "#c8e6c9",
        State::Progressing => "#fff3c4",
        State::Degraded => "#ffcdd2",
        State::Failed => "#ef9a9a",
        State::Paused => "#b2ebf2",
        State::Deleting => "#e1bee7",
        State::Disabled | State::Unknown => "#eeeeee",
    }
}

/// A graphviz digraph of every stack: one box per line, coloured by state, an edge from each
/// line to the lines under it.
pub fn dot(trees: &[Node]) -> String {
    let mut out = String::from(
        "digraph kab {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n",
    );
    let mut next = 0usize;
    fn walk(node: &Node, parent: Option<usize>, next: &mut usize, out: &mut String) {
        let id = *next;
        *next += 1;
        let mut text = format!("{}\n{}", label(node), node.state.as_str());
        let d = detail(node);
        if !d.is_empty() {
            let short: String = d.chars().take(80).collect();
            let more = if d.chars().count() > 80 { "…" } else { "" };
            text.push_str(&format!("\n{short}{more}"));
        }
        let _ = writeln!(
            out,
            "  n{id} [label=\"{}\", fillcolor=\"{}\"];",
            dot_escape(&text),
            fill(node.state)
        );
        if let Some(p) = parent {
            let _ = writeln!(out, "  n{p} -> n{id};");
        }
        for c in &node.children {
            walk(c, Some(id), next, out);
        }
    }
    for t in trees {
        walk(t, None, &mut next, &mut out);
    }
    out.push_str("}\n");
    out
}

/// JSON of one stack (its [`Node`]) or several (a [`StatusList`]); `compact` for one line per
/// document (`--watch`).
pub fn json(trees: &[Node], single: bool, compact: bool) -> serde_json::Result<String> {
    fn to_json<T: serde::Serialize>(v: &T, compact: bool) -> serde_json::Result<String> {
        if compact {
            serde_json::to_string(v)
        } else {
            serde_json::to_string_pretty(v)
        }
    }
    let mut s = if single && trees.len() == 1 {
        to_json(&trees[0], compact)?
    } else {
        to_json(
            &StatusList {
                items: trees.to_vec(),
            },
            compact,
        )?
    };
    s.push('\n');
    Ok(s)
}

/// YAML of one stack (its [`Node`]) or several (a [`StatusList`]).
pub fn yaml(trees: &[Node], single: bool) -> anyhow::Result<String> {
    Ok(if single && trees.len() == 1 {
        serde_saphyr::to_string(&trees[0])?
    } else {
        serde_saphyr::to_string(&StatusList {
            items: trees.to_vec(),
        })?
    })
}
