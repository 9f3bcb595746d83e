//! The configuration's two human-written lists checked against the code, so neither drifts:
//! `docs/configuration.md` (the reference: one `key | default | meaning` table per section) and
//! `examples/config.toml` (a complete file, every key with its default).
//!
//! The real defaults are `RawSettings::default()`, read through `Serialize` (derived on the raw
//! structs in test builds only). A default is compared as TOML spells it: the reference writes
//! `` `"127.0.0.1:8080"` ``, `` `20000` ``, `` `true` ``, or `(unset)` for an empty string or an
//! absent value. Each check returns its problems as text, so the tests can also show that a
//! broken reference or example is caught.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::raw::{self, RawSettings};
use super::Settings;

/// Keys whose values a failure message never shows.
const SECRET_KEYS: &[&str] = &["credyt.api_key", "admin.token"];

/// Keys `examples/config.toml` sets to something other than their default, on purpose; its
/// comment on each names the default. Each must be set there and differ from the default, so
/// the list cannot go stale.
const EXAMPLE_EXCEPTIONS: &[&str] = &[
    // The placeholder the proxy refuses (`raw::PLACEHOLDER_API_KEY`): the real key comes from
    // the environment, and the default (unset) would not make a complete example.
    "credyt.api_key",
    // The shipped sandbox tenants file and price books next to the example, so that it works
    // from a checkout.
    "tenants.file",
    "pricing.dir",
    // A volume's path, where a deployment keeps the outbox (as the container config does),
    // rather than a folder inside the checkout.
    "outbox.dir",
];

/// `section.key` tokens that name files, not keys (`tenants.toml`).
const FILE_EXTENSIONS: &[&str] = &["toml", "md", "json", "yaml", "yml", "rs"];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap()
}

/// Every key as `section.key`, in declaration order, with its default.
fn defaults() -> Vec<(String, Value)> {
    let Value::Object(sections) = serde_json::to_value(RawSettings::default()).unwrap() else {
        panic!("the raw settings do not serialize to a table");
    };
    let mut out = Vec::new();
    for (section, table) in sections {
        let Value::Object(keys) = table else {
            panic!("[{section}] does not serialize to a table");
        };
        for (key, value) in keys {
            out.push((format!("{section}.{key}"), value));
        }
    }
    out
}

/// An empty string and an absent value are both "unset".
fn normal(value: &Value) -> Option<&Value> {
    match value {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        other => Some(other),
    }
}

/// A value as the reference spells it (secrets withheld).
fn spelled(key: &str, value: &Value) -> String {
    match normal(value) {
        None => "(unset)".to_string(),
        Some(_) if SECRET_KEYS.contains(&key) => "(a secret, not shown)".to_string(),
        // A JSON string or number is also its TOML spelling for the values used here.
        Some(v) => format!("`{v}`"),
    }
}

/// Parses one TOML value (`"x"`, `20000`, `true`) into the form the defaults serialize to.
fn toml_value(literal: &str) -> Result<Value, String> {
    let mut table: BTreeMap<String, Value> = toml_edit::de::from_str(&format!("v = {literal}"))
        .map_err(|e| format!("`{literal}` is not a TOML value: {e}"))?;
    table
        .remove("v")
        .ok_or_else(|| format!("`{literal}` is not a TOML value"))
}

/// A default cell of the reference: `(unset)` (in backticks or not), or one TOML value in
/// backticks.
fn documented_default(cell: &str) -> Result<Option<Value>, String> {
    if cell == "(unset)" || cell == "`(unset)`" {
        return Ok(None);
    }
    let literal = cell
        .strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .filter(|c| !c.contains('`'))
        .ok_or_else(|| {
            format!("the default `{cell}` is neither (unset) nor a value in backticks")
        })?;
    toml_value(literal).map(Some)
}

/// Every `section.key` and `CREDYT_PROXY__SECTION__KEY` written anywhere in `text` must name a
/// key that exists.
fn mention_problems(text: &str, keys: &BTreeSet<&str>) -> Vec<String> {
    let sections = raw::section_names();
    let env_prefix = format!("{}__", super::ENV_PREFIX);
    let mut problems = Vec::new();
    let is_key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        for section in sections {
            let pattern = format!("{section}.");
            let mut from = 0;
            while let Some(at) = line[from..].find(&pattern) {
                let start = from + at;
                from = start + pattern.len();
                // `api.credyt.ai`, `docs/x.md`, `my_outbox.x` are not mentions of a section.
                let before = line[..start].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || "_./-".contains(c)) {
                    continue;
                }
                let key: String = line[from..]
                    .chars()
                    .take_while(|&c| is_key_char(c))
                    .collect();
                if key.is_empty() || FILE_EXTENSIONS.contains(&key.as_str()) {
                    continue;
                }
                let full = format!("{section}.{key}");
                if !keys.contains(full.as_str()) {
                    problems.push(format!("line {n}: `{full}` is not a configuration key"));
                }
            }
        }
        let mut from = 0;
        while let Some(at) = line[from..].find(&env_prefix) {
            let start = from + at + env_prefix.len();
            from = start;
            let name: String = line[start..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // The general forms: CREDYT_PROXY__<SECTION>__<KEY>, CREDYT_PROXY__SECTION__KEY,
            // CREDYT_PROXY__TELEMETRY__<KEY>.
            if name.is_empty() || name == "SECTION__KEY" || name.ends_with("__") {
                continue;
            }
            let full = name.to_ascii_lowercase().replacen("__", ".", 1);
            if !keys.contains(full.as_str()) {
                problems.push(format!(
                    "line {n}: {env_prefix}{name} does not name a configuration key"
                ));
            }
        }
    }
    problems
}

/// What is wrong with a reference: a key missing, a row for a key that does not exist, a
/// default that is not the code's, a malformed row, a mention of a key that does not exist.
fn reference_problems(doc: &str) -> Vec<String> {
    let defaults = defaults();
    let known: BTreeMap<&str, &Value> = defaults.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut problems = Vec::new();
    let mut documented: BTreeMap<String, usize> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut in_code = false;
    for (i, line) in doc.lines().enumerate() {
        let n = i + 1;
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            // A section's table is under a heading `## `[name]``; other headings end it.
            section = heading
                .trim()
                .strip_prefix("`[")
                .and_then(|h| h.strip_suffix("]`"))
                .map(str::to_string);
            if let Some(s) = &section {
                if !raw::section_names().contains(&s.as_str()) {
                    problems.push(format!("line {n}: [{s}] is not a section"));
                }
            }
            continue;
        }
        let Some(section) = &section else { continue };
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_start_matches('|')
            .trim_end_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells[0] == "key" || cells[0].starts_with("---") {
            continue;
        }
        let [key_cell, default_cell, meaning] = cells[..] else {
            problems.push(format!(
                "line {n}: a row of [{section}] has {} cells, not key | default | meaning",
                cells.len()
            ));
            continue;
        };
        let Some(key) = key_cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            problems.push(format!(
                "line {n}: the key `{key_cell}` is not written as `section.key`"
            ));
            continue;
        };
        if key.split_once('.').map(|(s, _)| s) != Some(section.as_str()) {
            problems.push(format!("line {n}: `{key}` is in the table of [{section}]"));
        }
        let Some(&default) = known.get(key) else {
            problems.push(format!("line {n}: `{key}` is not a configuration key"));
            continue;
        };
        if let Some(first) = documented.insert(key.to_string(), n) {
            problems.push(format!(
                "line {n}: `{key}` is documented twice (also on line {first})"
            ));
        }
        if meaning.is_empty() {
            problems.push(format!("line {n}: `{key}` has no meaning"));
        }
        match documented_default(default_cell) {
            Err(e) => problems.push(format!("line {n}: `{key}`: {e}")),
            Ok(written) if written.as_ref() != normal(default) => problems.push(format!(
                "line {n}: `{key}` is documented with default {default_cell}, its default is {}",
                spelled(key, default)
            )),
            Ok(_) => {}
        }
    }
    for (key, default) in &defaults {
        if !documented.contains_key(key) {
            problems.push(format!(
                "`{key}` (default {}) is missing from the reference",
                spelled(key, default)
            ));
        }
    }
    // A row for an unknown key is also a mention of it: reported once.
    for problem in mention_problems(doc, &known.keys().copied().collect()) {
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    }
    problems
}

/// What is wrong with the complete example: a key that does not exist, a key missing (set, or
/// commented out when its default is unset), a value that is not the default (outside
/// [`EXAMPLE_EXCEPTIONS`]).
fn example_problems(text: &str) -> Vec<String> {
    let defaults = defaults();
    let known: BTreeMap<&str, &Value> = defaults.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut problems = Vec::new();
    let set: BTreeMap<String, BTreeMap<String, Value>> = match toml_edit::de::from_str(text) {
        Ok(set) => set,
        Err(e) => return vec![format!("not a file of sections of keys: {e}")],
    };
    let mut present: BTreeSet<String> = BTreeSet::new();
    for (section, keys) in &set {
        for (key, value) in keys {
            let full = format!("{section}.{key}");
            let Some(&default) = known.get(full.as_str()) else {
                problems.push(format!("`{full}` is not a configuration key"));
                continue;
            };
            present.insert(full.clone());
            let exception = EXAMPLE_EXCEPTIONS.contains(&full.as_str());
            if value.is_null() || default.is_null() {
                problems.push(format!(
                    "`{full}` is unset by default: comment it out (`# {key} = ...`) as an example"
                ));
            } else if exception && value == default {
                problems.push(format!(
                    "`{full}` is its default now: remove it from EXAMPLE_EXCEPTIONS"
                ));
            } else if !exception && value != default {
                problems.push(format!(
                    "`{full}` is set to {}, its default is {}",
                    spelled(&full, value),
                    spelled(&full, default)
                ));
            }
        }
    }
    // Commented-out keys (`# key = value` under a section): only those without a default.
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            section = header.split(']').next().unwrap_or("").trim().to_string();
            continue;
        }
        let Some(comment) = line.strip_prefix('#') else {
            continue;
        };
        let comment = comment.trim_start();
        let key: String = comment
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if key.is_empty() || !comment[key.len()..].trim_start().starts_with('=') {
            continue;
        }
        let full = format!("{section}.{key}");
        match known.get(full.as_str()) {
            None => problems.push(format!(
                "line {n}: `{full}` (commented out) is not a configuration key"
            )),
            Some(&default) => {
                if normal(default).is_some() {
                    problems.push(format!(
                        "line {n}: `{full}` is commented out but has a default ({}): set it",
                        spelled(&full, default)
                    ));
                }
                present.insert(full);
            }
        }
    }
    for (key, default) in &defaults {
        if !present.contains(key) {
            problems.push(format!(
                "`{key}` (default {}) is missing from the example",
                spelled(key, default)
            ));
        }
    }
    for key in EXAMPLE_EXCEPTIONS {
        if !set
            .get(key.split('.').next().unwrap_or(""))
            .is_some_and(|s| s.contains_key(key.split('.').nth(1).unwrap_or("")))
        {
            problems.push(format!(
                "`{key}` is in EXAMPLE_EXCEPTIONS but not set in the example"
            ));
        }
    }
    problems
}

/// Replaces `from` (which must be there) with `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` is not in the text any more");
    text.replacen(from, to, 1)
}

fn assert_reports(problems: &[String], expected: &[&str]) {
    for e in expected {
        assert!(
            problems.iter().any(|p| p.contains(e)),
            "`{e}` not reported:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(
        problems.len(),
        expected.len(),
        "unexpected problems:\n{}",
        problems.join("\n")
    );
}

/// The defaults read through `Serialize` are the keys the loader reads (`struct_fields`, the
/// names `deny_unknown_fields` accepts), section by section.
#[test]
fn the_serialized_defaults_are_the_keys_the_loader_reads() {
    let loader: Vec<(&str, &[&str])> = vec![
        ("server", raw::struct_fields::<raw::RawServer>()),
        ("log", raw::struct_fields::<raw::RawLog>()),
        ("credyt", raw::struct_fields::<raw::RawCredyt>()),
        ("tenants", raw::struct_fields::<raw::RawTenants>()),
        ("pricing", raw::struct_fields::<raw::RawPricing>()),
        ("ingest", raw::struct_fields::<raw::RawIngest>()),
        ("identity", raw::struct_fields::<raw::RawIdentity>()),
        ("outbox", raw::struct_fields::<raw::RawOutbox>()),
        ("rate_limit", raw::struct_fields::<raw::RawRateLimit>()),
        ("admin", raw::struct_fields::<raw::RawAdmin>()),
        ("telemetry", raw::struct_fields::<raw::RawTelemetry>()),
        ("shutdown", raw::struct_fields::<raw::RawShutdown>()),
        ("webhooks", raw::struct_fields::<raw::RawWebhooks>()),
        ("gateway", raw::struct_fields::<raw::RawGateway>()),
        ("balance", raw::struct_fields::<raw::RawBalance>()),
    ];
    let names: Vec<&str> = loader.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        names,
        raw::section_names(),
        "a section was added: list its struct here"
    );
    let from_loader: Vec<String> = loader
        .iter()
        .flat_map(|(s, keys)| keys.iter().map(move |k| format!("{s}.{k}")))
        .collect();
    let serialized: Vec<String> = defaults().into_iter().map(|(k, _)| k).collect();
    assert_eq!(serialized, from_loader);
}

#[test]
fn the_reference_documents_every_key_with_its_default() {
    let problems = reference_problems(&read("docs/configuration.md"));
    assert!(
        problems.is_empty(),
        "docs/configuration.md disagrees with the code:\n{}",
        problems.join("\n")
    );
}

/// The check is not vacuous: a missing key, a key that does not exist (in a table, in the
/// text, as a variable), a wrong default and an empty string written for `(unset)` are each
/// reported.
#[test]
fn the_reference_check_catches_missing_unknown_and_wrong_keys() {
    let doc = read("docs/configuration.md");
    assert!(reference_problems(&doc).is_empty());
    let ack_row = doc
        .lines()
        .find(|l| l.starts_with("| `ingest.ack` |"))
        .unwrap();
    let broken = edit(&doc, &format!("{ack_row}\n"), "");
    let broken = edit(
        &broken,
        "| `server.workers` | `1` |",
        "| `server.colour` | `\"red\"` | a colour |\n| `server.workers` | `2` |",
    );
    let broken = edit(
        &broken,
        "| `credyt.api_key` | `(unset)` |",
        "| `credyt.api_key` | `\"\"` |",
    );
    let broken = edit(
        &broken,
        "| `outbox.max_group` | `512` |",
        "| `outbox.max_group` | 512 |",
    );
    let broken = format!(
        "{broken}\nSee `outbox.segment_bytes`, or set CREDYT_PROXY__OUTBOX__SEGMENT_BYTES.\n"
    );
    assert_reports(
        &reference_problems(&broken),
        &[
            "`ingest.ack` (default `\"durable\"`) is missing",
            "`server.colour` is not a configuration key",
            "`server.workers` is documented with default `2`, its default is `1`",
            "`credyt.api_key` is documented with default `\"\"`, its default is (unset)",
            "`outbox.max_group`: the default `512` is neither",
            "`outbox.segment_bytes` is not a configuration key",
            "CREDYT_PROXY__OUTBOX__SEGMENT_BYTES does not name a configuration key",
        ],
    );
    // A default written in another section's table is reported too.
    let moved = edit(
        &doc,
        "## `[shutdown]`",
        "## `[shutdown]`\n\n| key | default | meaning |\n|---|---|---|\n| `log.format` | `\"pretty\"` | again |",
    );
    assert_reports(
        &reference_problems(&moved),
        &[
            "`log.format` is in the table of [shutdown]",
            "`log.format` is documented twice",
        ],
    );
}

#[test]
fn the_example_config_has_every_key_with_its_default() {
    let problems = example_problems(&read("examples/config.toml"));
    assert!(
        problems.is_empty(),
        "examples/config.toml disagrees with the code:\n{}",
        problems.join("\n")
    );
}

/// The check is not vacuous: an unknown key, a missing key, a changed default, a commented-out
/// key that has a default and a set key that has none are each reported.
#[test]
fn the_example_check_catches_unknown_missing_and_changed_keys() {
    let example = read("examples/config.toml");
    assert!(example_problems(&example).is_empty());
    let max_group = example
        .lines()
        .find(|l| l.starts_with("max_group = "))
        .unwrap();
    let broken = edit(&example, &format!("{max_group}\n"), "");
    let broken = edit(&broken, "\nworkers = 1 ", "\nworkers = 2 ");
    let broken = edit(&broken, "\nburst = 2000", "\n# burst = 2000");
    let broken = edit(&broken, "[log]\n", "[log]\ncolour = \"red\"\n");
    let broken = edit(
        &broken,
        "# service_name = ",
        "service_name = \"x\"\n# servce_name = ",
    );
    assert_reports(
        &example_problems(&broken),
        &[
            "`outbox.max_group` (default `512`) is missing from the example",
            "`server.workers` is set to `2`, its default is `1`",
            "`rate_limit.burst` is commented out but has a default (`2000`)",
            "`log.colour` is not a configuration key",
            "`telemetry.service_name` is unset by default",
            "`telemetry.servce_name` (commented out) is not a configuration key",
        ],
    );
    // A secret's value never shows in a problem.
    let leaked = edit(
        &example,
        &format!("api_key = \"{}\"", raw::PLACEHOLDER_API_KEY),
        "api_key = \"\"",
    );
    let leaked = edit(
        &leaked,
        "# token = \"...\"",
        "token = \"adm_0123456789abcdef\"",
    );
    let problems = example_problems(&leaked);
    assert_reports(
        &problems,
        &[
            "`credyt.api_key` is its default now",
            "`admin.token` is unset by default",
        ],
    );
    assert!(!problems.join("\n").contains("adm_0123456789abcdef"));
    let secret = Value::String("adm_0123456789abcdef".into());
    assert_eq!(spelled("admin.token", &secret), "(a secret, not shown)");
    assert_eq!(spelled("log.filter", &secret), "`\"adm_0123456789abcdef\"`");
}

/// The container's config (`deploy/kubernetes/base/config.toml`) loads: every key it sets
/// exists and every value is valid (its key comes from a file, so no environment is needed).
#[test]
fn the_container_config_is_valid() {
    let path = repo_file("deploy/kubernetes/base/config.toml");
    let s = Settings::load_from(&path, Some(HashMap::new())).unwrap();
    assert_eq!(s.shutdown.drain_delay.as_millis(), 5000);
}
