//! The `MailCluster` field reference in Markdown, generated from the CRD's schema so that the
//! documentation says exactly what the apiserver enforces (`docs/reference.md` holds it; a test
//! fails when it is stale).

use std::fmt::Write;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};

/// Subtrees larger than this, below the top two levels, are embedded Kubernetes types
/// (affinity, ...): one row, not hundreds; `kubectl explain` documents them.
const MAX_SUBTREE: usize = 60;

fn is_embedded_type(path: &str, schema: &JSONSchemaProps) -> bool {
    path.matches('.').count() >= 2 && subtree_size(schema) > MAX_SUBTREE
}

/// One Markdown document with a table of every field of every served version.
pub fn markdown(crd: &CustomResourceDefinition) -> String {
    let mut out = String::new();
    let kind = &crd.spec.names.kind;
    let _ = writeln!(out, "# {kind} field reference\n");
    let _ = writeln!(
        out,
        "Generated from the CRD (`mailcluster-operator crd`); regenerate with \
         `MAILCLUSTER_UPDATE_DOCS=1 cargo test -p mailcluster-operator --lib reference`. \
         `kubectl explain {} --recursive` shows the same text. Rules marked *CEL* are checked by \
         the apiserver when the object is created or changed.\n",
        crd.spec.names.plural
    );
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let _ = writeln!(out, "## {}/{}\n", crd.spec.group, version.name);
        let Some(root) = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        else {
            continue;
        };
        rules(&mut out, "(object)", root);
        let _ = writeln!(out, "| field | type | required | description |");
        let _ = writeln!(out, "| --- | --- | --- | --- |");
        for name in ["spec", "status"] {
            if let Some(p) = root.properties.as_ref().and_then(|p| p.get(name)) {
                rows(&mut out, name, p, false);
            }
        }
        let _ = writeln!(out);
    }
    out
}

fn rows(out: &mut String, path: &str, schema: &JSONSchemaProps, required: bool) {
    let _ = writeln!(
        out,
        "| `{path}` | {} | {} | {} |",
        type_of(schema),
        if required { "yes" } else { "" },
        cell(&describe(schema, is_embedded_type(path, schema)))
    );
    if is_embedded_type(path, schema) {
        return;
    }
    let needed = schema.required.clone().unwrap_or_default();
    if let Some(props) = &schema.properties {
        for (name, p) in props {
            rows(out, &format!("{path}.{name}"), p, needed.contains(name));
        }
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items
        && item.properties.is_some()
    {
        let needed = item.required.clone().unwrap_or_default();
        for (name, p) in item.properties.iter().flatten() {
            rows(out, &format!("{path}[].{name}"), p, needed.contains(name));
        }
    }
}

fn type_of(s: &JSONSchemaProps) -> String {
    let base = s.type_.clone().unwrap_or_else(|| {
        if s.x_kubernetes_int_or_string == Some(true) {
            "int or string".into()
        } else {
            "any".into()
        }
    });
    match (&s.items, base.as_str()) {
        (Some(JSONSchemaPropsOrArray::Schema(item)), "array") => {
            format!("[]{}", item.type_.clone().unwrap_or_else(|| "any".into()))
        }
        _ => base,
    }
}

fn describe(s: &JSONSchemaProps, embedded: bool) -> String {
    let mut text = s.description.clone().unwrap_or_default();
    let mut facts = Vec::new();
    if let Some(d) = &s.default {
        facts.push(format!("default `{}`", d.0));
    }
    if let Some(e) = &s.enum_ {
        let values: Vec<String> = e.iter().map(|v| format!("`{}`", v.0)).collect();
        facts.push(format!("one of {}", values.join(", ")));
    }
    match (s.minimum, s.maximum) {
        (Some(a), Some(b)) => facts.push(format!("{a}–{b}")),
        (Some(a), None) => facts.push(format!("≥ {a}")),
        (None, Some(b)) => facts.push(format!("≤ {b}")),
        (None, None) => {}
    }
    if let Some(n) = s.max_items {
        facts.push(format!("at most {n} items"));
    }
    if let Some(n) = s.max_length {
        facts.push(format!("at most {n} characters"));
    }
    if let Some(p) = &s.pattern {
        facts.push(format!("pattern `{p}`"));
    }
    for rule in s.x_kubernetes_validations.iter().flatten() {
        let message = rule.message.clone().unwrap_or_else(|| rule.rule.clone());
        facts.push(format!("*CEL:* {message}"));
    }
    if embedded {
        facts.push("a Kubernetes type: see `kubectl explain`".into());
    }
    if !facts.is_empty() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!("({})", facts.join("; ")));
    }
    text
}

fn rules(out: &mut String, what: &str, s: &JSONSchemaProps) {
    for rule in s.x_kubernetes_validations.iter().flatten() {
        let message = rule.message.clone().unwrap_or_else(|| rule.rule.clone());
        let _ = writeln!(out, "- {what}: *CEL:* {message}");
    }
    if s.x_kubernetes_validations.is_some() {
        let _ = writeln!(out);
    }
}

fn subtree_size(s: &JSONSchemaProps) -> usize {
    let props: usize = s
        .properties
        .iter()
        .flatten()
        .map(|(_, p)| subtree_size(p))
        .sum();
    let items = match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(i)) => subtree_size(i),
        _ => 0,
    };
    1 + props + items
}

/// Markdown table cells: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn every_spec_field_is_listed_with_its_description() {
        let crd = crate::crd::MailCluster::crd();
        let md = markdown(&crd);
        assert!(md.contains("| `spec.hostname` | string | yes |"), "{md}");
        assert!(
            md.contains("| `spec.listeners[].port` | integer | yes |"),
            "{md}"
        );
        assert!(md.contains("*CEL:*"));
        // The embedded affinity type is one row, not its hundreds of fields.
        assert!(!md.contains("spec.scheduling.affinity.nodeAffinity"));
    }

    /// `docs/reference.md` is what the CRD says today.
    #[test]
    fn docs_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference.md");
        let fresh = markdown(&crate::crd::MailCluster::crd());
        if std::env::var_os("MAILCLUSTER_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "docs/reference.md is stale: run MAILCLUSTER_UPDATE_DOCS=1 cargo test -p mailcluster-operator --lib reference"
        );
    }

    #[test]
    fn pipes_in_descriptions_do_not_break_the_table() {
        assert_eq!(cell("a | b\n  c"), "a \\| b c");
    }
}
