//! Loading and validation: the pricing directory -> one immutable [`PricingSet`].
//!
//! Contract: reads every `*.toml` of the directory (following symlinks, so a Kubernetes
//! ConfigMap mount with its `..data` indirection reads as plain files; dot-entries are skipped),
//! hashes exactly the bytes it parses, parses them with `toml_edit` keeping spans, and reads
//! every number from its literal text (never `f64`). Validation collects **every** mistake, each
//! with file, line and TOML key path; a set is built only when there is none. This is the only
//! pricing code that does I/O.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::book::{
    Basis, Period, Price, PricingModel, Rates, ResolvedBook, ResolvedVersion, Row, Tier, Tiering,
    VolumePart,
};
use super::money::{self, DecimalTextError};
use super::PricingSet;
use crate::domain::UsageType;

/// The file assigning tenants to books.
pub const ASSIGNMENTS_FILE: &str = "assignments.toml";
/// The optional file declaring assets and their precision.
pub const ASSETS_FILE: &str = "assets.toml";

/// One mistake in a pricing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    /// 1-based line, when the mistake has a location in the file.
    pub line: Option<usize>,
    /// TOML key path, e.g. `versions[0].prices[2].tiers[1].up_to`.
    pub path: String,
    pub code: &'static str,
    pub message: String,
}

impl LoadError {
    /// Stable snake_case code of the mistake (`unknown_model`, `tiers_unordered`, ...).
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {} [{}]", self.message, self.code)
    }
}

/// Every mistake found while loading a pricing directory (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl LoadErrors {
    pub fn code(&self) -> &'static str {
        "invalid_pricing"
    }
    pub fn errors(&self) -> &[LoadError] {
        &self.0
    }
}

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// One file's name (relative to the pricing dir) and content.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Reads every non-hidden `*.toml` in `dir`, sorted by name (one version of a ConfigMap
/// volume whole, see [`read_files`]).
pub fn read_dir_files(dir: &Path) -> Result<Vec<SourceFile>, LoadErrors> {
    let first = read_files(dir);
    if first.is_err() && dir.join("..data").exists() {
        // The read raced the kubelet's removal of the version it resolved: read the new one.
        return read_files(dir);
    }
    first
}

fn read_files(dir: &Path) -> Result<Vec<SourceFile>, LoadErrors> {
    let io_err = |file: &str, e: std::io::Error| {
        LoadErrors(vec![LoadError {
            file: file.to_owned(),
            line: None,
            path: String::new(),
            code: "io",
            message: e.to_string(),
        }])
    };
    let dir_name = dir.display().to_string();
    // A Kubernetes ConfigMap volume: every file is a link through `..data`, which the kubelet
    // swaps atomically to a new timestamped directory. Reading each file through its own link
    // could mix two versions when the swap lands mid-read; resolving `..data` once reads one
    // version whole (the kubelet deletes the old directory only after the swap, so a read
    // that races the deletion fails with an error and the next poll reads the new version).
    let snapshot = std::fs::canonicalize(dir.join("..data")).ok();
    let dir = snapshot.as_deref().filter(|d| d.is_dir()).unwrap_or(dir);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(&dir_name, e))? {
        let entry = entry.map_err(|e| io_err(&dir_name, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        // Follows symlinks (ConfigMap files are links through `..data`).
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => continue,
            Err(e) => return Err(io_err(&name, e)),
        }
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&name, e))?;
        files.push(SourceFile { name, text });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// sha256 (hex) of the files' names and contents, in name order.
pub fn content_hash(files: &[SourceFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update((f.name.len() as u64).to_be_bytes());
        h.update(f.name.as_bytes());
        h.update((f.text.len() as u64).to_be_bytes());
        h.update(f.text.as_bytes());
    }
    hex::encode(h.finalize())
}

type Span = Option<Range<usize>>;

/// Per-file error sink with line lookup.
struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    errors: &'a mut Vec<LoadError>,
}

impl Cx<'_> {
    fn line(&self, span: &Span) -> Option<usize> {
        span.as_ref().map(|s| {
            let end = s.start.min(self.text.len());
            self.text.as_bytes()[..end]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1
        })
    }
    fn err(&mut self, span: &Span, path: &str, code: &'static str, message: impl Into<String>) {
        let line = self.line(span);
        self.errors.push(LoadError {
            file: self.file.to_owned(),
            line,
            path: path.to_owned(),
            code,
            message: message.into(),
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn key_span(t: &dyn TableLike, key: &str) -> Span {
    t.key(key)
        .and_then(|k| k.span())
        .or_else(|| t.get(key).and_then(Item::span))
}

/// A table's location: its own span, else its first key's.
fn table_span(own: Span, t: &dyn TableLike) -> Span {
    own.or_else(|| t.iter().next().and_then(|(k, _)| key_span(t, k)))
}

fn check_keys(cx: &mut Cx<'_>, t: &dyn TableLike, path: &str, allowed: &[&str]) {
    for (k, _) in t.iter() {
        if !allowed.contains(&k) {
            cx.err(
                &key_span(t, k),
                &join(path, k),
                "unknown_key",
                format!("unknown key `{k}` (allowed here: {})", allowed.join(", ")),
            );
        }
    }
}

/// `Err(())`: present but wrong, already reported.
type Got<T> = Result<Option<(T, Span)>, ()>;

fn get_str(cx: &mut Cx<'_>, t: &dyn TableLike, path: &str, key: &str) -> Got<String> {
    match t.get(key) {
        None => Ok(None),
        Some(item) => match item.as_str() {
            Some(s) => Ok(Some((s.to_owned(), item.span()))),
            None => {
                cx.err(
                    &item.span(),
                    &join(path, key),
                    "wrong_type",
                    format!("`{key}` must be a string, found {}", item.type_name()),
                );
                Err(())
            }
        },
    }
}

fn required<T>(
    cx: &mut Cx<'_>,
    span: &Span,
    path: &str,
    key: &str,
    got: Got<T>,
) -> Option<(T, Span)> {
    match got {
        Ok(Some(v)) => Some(v),
        Ok(None) => {
            cx.err(
                span,
                &join(path, key),
                "missing_key",
                format!("missing required key `{key}`"),
            );
            None
        }
        Err(()) => None,
    }
}

fn req_str(
    cx: &mut Cx<'_>,
    t: &dyn TableLike,
    span: &Span,
    path: &str,
    key: &str,
) -> Option<(String, Span)> {
    let got = get_str(cx, t, path, key);
    required(cx, span, path, key, got)
}

/// A decimal from a TOML integer (exact `i64`), float (its literal text, never the `f64`), or
/// quoted decimal string.
fn get_decimal(cx: &mut Cx<'_>, t: &dyn TableLike, path: &str, key: &str) -> Got<Decimal> {
    let Some(item) = t.get(key) else {
        return Ok(None);
    };
    let span = item.span();
    let p = join(path, key);
    let parsed = match item.as_value() {
        Some(Value::Integer(i)) => Ok(Decimal::from(*i.value())),
        Some(Value::Float(f)) => match f.span().and_then(|s| cx.text.get(s)) {
            Some(literal) => money::parse_decimal(literal.trim(), true),
            None => Err(DecimalTextError::NotANumber(
                "<float without literal text>".into(),
            )),
        },
        Some(Value::String(s)) => money::parse_decimal(s.value(), false),
        _ => {
            cx.err(
                &span,
                &p,
                "wrong_type",
                format!(
                    "`{key}` must be a decimal number or quoted decimal, found {}",
                    item.type_name()
                ),
            );
            return Err(());
        }
    };
    match parsed {
        Ok(d) => Ok(Some((d, span))),
        Err(e) => {
            cx.err(&span, &p, e.code(), e.to_string());
            Err(())
        }
    }
}

/// The tables of an array of tables (`[[x]]`) or of an inline array of inline tables.
fn tables<'d>(
    cx: &mut Cx<'_>,
    item: &'d Item,
    path: &str,
) -> Option<Vec<(&'d dyn TableLike, Span)>> {
    match item {
        Item::ArrayOfTables(a) => Some(
            a.iter()
                .map(|t| (t as &dyn TableLike, table_span(t.span(), t)))
                .collect(),
        ),
        Item::Value(Value::Array(arr)) => {
            let mut out = Vec::new();
            for (i, v) in arr.iter().enumerate() {
                match v.as_inline_table() {
                    Some(t) => out.push((t as &dyn TableLike, v.span())),
                    None => cx.err(
                        &v.span(),
                        &format!("{path}[{i}]"),
                        "wrong_type",
                        format!("expected a table, found {}", v.type_name()),
                    ),
                }
            }
            Some(out)
        }
        _ => {
            cx.err(
                &item.span(),
                path,
                "wrong_type",
                format!("expected an array of tables, found {}", item.type_name()),
            );
            None
        }
    }
}

fn parse_doc<'t>(cx: &mut Cx<'_>, text: &'t str) -> Option<ImDocument<&'t str>> {
    match ImDocument::parse(text) {
        Ok(doc) => Some(doc),
        Err(e) => {
            cx.err(&e.span(), "", "toml_syntax", e.message().trim().to_owned());
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// assets.toml

fn parse_assets(cx: &mut Cx<'_>, root: &dyn TableLike, assets: &mut HashMap<String, u32>) {
    for (code, item) in root.iter() {
        let Some(t) = item.as_table_like() else {
            cx.err(
                &item.span(),
                code,
                "wrong_type",
                "an asset must be a table like `{ precision = 2 }`",
            );
            continue;
        };
        let span = table_span(item.span(), t);
        check_keys(cx, t, code, &["precision", "name"]);
        let _ = get_str(cx, t, code, "name");
        let Some(p) = t.get("precision") else {
            cx.err(
                &span,
                &join(code, "precision"),
                "missing_key",
                "missing required key `precision`",
            );
            continue;
        };
        match p.as_integer() {
            Some(n) if (0..=i64::from(money::MAX_PRECISION)).contains(&n) => {
                assets.insert(code.to_owned(), n as u32);
            }
            _ => cx.err(
                &p.span(),
                &join(code, "precision"),
                "precision_overflow",
                format!(
                    "precision must be an integer from 0 to {}",
                    money::MAX_PRECISION
                ),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// assignments.toml

struct Assignments {
    version: Option<String>,
    default: Option<(String, Option<usize>)>,
    tenants: Vec<(String, String, Option<usize>)>,
}

fn parse_assignments(cx: &mut Cx<'_>, root: &dyn TableLike) -> Assignments {
    check_keys(cx, root, "", &["version", "default", "tenants"]);
    let version = get_str(cx, root, "", "version")
        .ok()
        .flatten()
        .map(|(v, _)| v);
    let default = get_str(cx, root, "", "default")
        .ok()
        .flatten()
        .map(|(v, s)| (v, cx.line(&s)));
    let mut tenants = Vec::new();
    if let Some(item) = root.get("tenants") {
        match item.as_table_like() {
            Some(t) => {
                for (tenant, _) in t.iter() {
                    if let Ok(Some((book, span))) = get_str(cx, t, "tenants", tenant) {
                        tenants.push((tenant.to_owned(), book, cx.line(&span)));
                    }
                }
            }
            None => cx.err(
                &item.span(),
                "tenants",
                "wrong_type",
                "`tenants` must be a table of tenant = \"book\"",
            ),
        }
    }
    Assignments {
        version,
        default,
        tenants,
    }
}

// ---------------------------------------------------------------------------------------------
// books

struct RawVersion {
    effective_from: DateTime<Utc>,
    label: String,
    prices: Vec<Arc<Price>>,
}

struct RawBook {
    file: String,
    extends: Option<(String, Option<usize>)>,
    versions: Vec<RawVersion>,
}

fn parse_book(
    cx: &mut Cx<'_>,
    root: &dyn TableLike,
    assets: &HashMap<String, u32>,
) -> Option<RawBook> {
    let before = cx.errors.len();
    check_keys(cx, root, "", &["extends", "description", "versions"]);
    let _ = get_str(cx, root, "", "description");
    let extends = get_str(cx, root, "", "extends")
        .ok()
        .flatten()
        .map(|(v, s)| (v, cx.line(&s)));
    let mut versions: Vec<RawVersion> = Vec::new();
    let mut seen_from: HashMap<DateTime<Utc>, usize> = HashMap::new();
    match root.get("versions") {
        None => cx.err(
            &Some(0..0),
            "versions",
            "missing_key",
            "a book needs at least one `[[versions]]`",
        ),
        Some(item) => {
            for (vi, (vt, vspan)) in tables(cx, item, "versions")
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let path = format!("versions[{vi}]");
                // Checked even when the version has other mistakes, so both are reported.
                if let Some((_, at)) = vt
                    .get("effective_from")
                    .and_then(|i| read_instant(cx.text, i))
                {
                    if let Some(prev) = seen_from.insert(at, vi) {
                        cx.err(
                            &key_span(vt, "effective_from"),
                            &join(&path, "effective_from"),
                            "duplicate_effective_from",
                            format!("same effective_from instant as versions[{prev}]"),
                        );
                    }
                }
                if let Some(v) = parse_version(cx, vt, &vspan, &path, assets) {
                    versions.push(v);
                }
            }
        }
    }
    if cx.errors.len() > before {
        return None;
    }
    versions.sort_by_key(|v| v.effective_from);
    Some(RawBook {
        file: cx.file.to_owned(),
        extends,
        versions,
    })
}

/// An `effective_from` value: TOML datetime (its literal text) or string, RFC 3339 with offset.
fn read_instant(text: &str, item: &Item) -> Option<(String, DateTime<Utc>)> {
    let literal = match item.as_value()? {
        Value::Datetime(d) => d.span().and_then(|s| text.get(s))?.trim().to_owned(),
        Value::String(s) => s.value().trim().to_owned(),
        _ => return None,
    };
    let at = DateTime::parse_from_rfc3339(&literal)
        .ok()?
        .with_timezone(&Utc);
    Some((literal, at))
}

fn parse_version(
    cx: &mut Cx<'_>,
    t: &dyn TableLike,
    span: &Span,
    path: &str,
    assets: &HashMap<String, u32>,
) -> Option<RawVersion> {
    let before = cx.errors.len();
    check_keys(cx, t, path, &["effective_from", "label", "prices"]);
    let from_item = t.get("effective_from");
    let mut effective = None;
    match from_item {
        None => cx.err(
            span,
            &join(path, "effective_from"),
            "missing_key",
            "missing required key `effective_from`",
        ),
        Some(item) => {
            match read_instant(cx.text, item) {
                Some(v) => effective = Some(v),
                None => cx.err(
                    &item.span(),
                    &join(path, "effective_from"),
                    "invalid_date",
                    "effective_from must be an RFC 3339 date-time with an offset, e.g. 2026-01-01T00:00:00Z",
                ),
            }
        }
    }
    let label = get_str(cx, t, path, "label").ok().flatten().map(|(l, _)| l);
    let mut prices: Vec<Arc<Price>> = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    if let Some(item) = t.get("prices") {
        let ppath = join(path, "prices");
        for (pi, (pt, pspan)) in tables(cx, item, &ppath)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let path = format!("{ppath}[{pi}]");
            if let Ok(Some((id, id_span))) = get_str(cx, pt, &path, "id") {
                if let Some(prev) = ids.insert(id.clone(), pi) {
                    cx.err(
                        &id_span,
                        &join(&path, "id"),
                        "duplicate_price_id",
                        format!("price id `{id}` already used by {ppath}[{prev}] in this version"),
                    );
                }
            }
            if let Some(p) = parse_price(cx, pt, &pspan, &path, assets) {
                prices.push(Arc::new(p));
            }
        }
    } else {
        cx.err(
            span,
            &join(path, "prices"),
            "missing_key",
            "missing required key `prices`",
        );
    }
    if cx.errors.len() > before {
        return None;
    }
    let (literal, effective_from) = effective?;
    Some(RawVersion {
        effective_from,
        label: label.unwrap_or(literal),
        prices,
    })
}

const RATE_KEYS: [&str; 6] = [
    "unit_price",
    "volume_rate",
    "package_size",
    "tiers",
    "min_amount",
    "max_amount",
];

#[derive(Clone, Default)]
struct RateFields {
    unit_price: Option<Decimal>,
    volume_rate: Option<Decimal>,
    package_size: Option<Decimal>,
    tiers: Option<Box<[Tier]>>,
    min_amount: Option<Decimal>,
    max_amount: Option<Decimal>,
}

impl RateFields {
    /// `self` (a row's own fields) over `defaults` (the price's), field by field.
    fn over(self, defaults: &RateFields) -> RateFields {
        RateFields {
            unit_price: self.unit_price.or(defaults.unit_price),
            volume_rate: self.volume_rate.or(defaults.volume_rate),
            package_size: self.package_size.or(defaults.package_size),
            tiers: self.tiers.or_else(|| defaults.tiers.clone()),
            min_amount: self.min_amount.or(defaults.min_amount),
            max_amount: self.max_amount.or(defaults.max_amount),
        }
    }
}

fn non_negative(cx: &mut Cx<'_>, t: &dyn TableLike, path: &str, key: &str) -> Option<Decimal> {
    let (d, span) = get_decimal(cx, t, path, key).ok().flatten()?;
    if d.is_sign_negative() && !d.is_zero() {
        cx.err(
            &span,
            &join(path, key),
            "negative_price",
            format!("`{key}` must not be negative ({d})"),
        );
        return None;
    }
    Some(d)
}

fn positive(
    cx: &mut Cx<'_>,
    t: &dyn TableLike,
    path: &str,
    key: &str,
    code: &'static str,
) -> Option<Decimal> {
    let (d, span) = get_decimal(cx, t, path, key).ok().flatten()?;
    if d <= Decimal::ZERO {
        cx.err(
            &span,
            &join(path, key),
            code,
            format!("`{key}` must be greater than zero ({d})"),
        );
        return None;
    }
    Some(d)
}

fn parse_rate_fields(cx: &mut Cx<'_>, t: &dyn TableLike, path: &str) -> RateFields {
    let mut f = RateFields {
        unit_price: non_negative(cx, t, path, "unit_price"),
        volume_rate: non_negative(cx, t, path, "volume_rate"),
        package_size: positive(cx, t, path, "package_size", "invalid_package_size"),
        tiers: None,
        min_amount: non_negative(cx, t, path, "min_amount"),
        max_amount: non_negative(cx, t, path, "max_amount"),
    };
    if let (Some(min), Some(max)) = (f.min_amount, f.max_amount) {
        if min > max {
            cx.err(
                &key_span(t, "min_amount"),
                &join(path, "min_amount"),
                "min_above_max",
                format!("`min_amount` {min} is above `max_amount` {max}"),
            );
        }
    }
    if let Some(item) = t.get("tiers") {
        let tpath = join(path, "tiers");
        let list = tables(cx, item, &tpath).unwrap_or_default();
        if list.is_empty() {
            cx.err(
                &item.span(),
                &tpath,
                "missing_tiers",
                "`tiers` must list at least one tier",
            );
        }
        let n = list.len();
        let mut out = Vec::with_capacity(n);
        let mut prev: Option<Decimal> = None;
        for (i, (tt, tspan)) in list.into_iter().enumerate() {
            let p = format!("{tpath}[{i}]");
            check_keys(cx, tt, &p, &["up_to", "volume_rate", "unit_price"]);
            let tier_unit = non_negative(cx, tt, &p, "unit_price");
            let up_to = positive(cx, tt, &p, "up_to", "invalid_tier_bound");
            let up_span = key_span(tt, "up_to");
            let rate = non_negative(cx, tt, &p, "volume_rate");
            if tt.get("volume_rate").is_none() {
                cx.err(
                    &tspan,
                    &join(&p, "volume_rate"),
                    "missing_key",
                    "missing required key `volume_rate`",
                );
            }
            let last = i + 1 == n;
            match (tt.get("up_to").is_some(), last) {
                (false, false) => cx.err(
                    &tspan,
                    &p,
                    "open_tier_not_last",
                    "only the last tier may be open (no `up_to`)",
                ),
                (true, true) => cx.err(
                    &up_span,
                    &join(&p, "up_to"),
                    "last_tier_bounded",
                    "the last tier must be open (no `up_to`) so every quantity has a price",
                ),
                _ => {}
            }
            if let (Some(u), Some(pv)) = (up_to, prev) {
                if u <= pv {
                    cx.err(
                        &up_span,
                        &join(&p, "up_to"),
                        "tiers_unordered",
                        format!(
                            "tier bounds must increase: up_to {u} is not above the previous {pv}"
                        ),
                    );
                }
            }
            if up_to.is_some() {
                prev = up_to;
            }
            if let Some(r) = rate {
                out.push(Tier {
                    up_to: if last { None } else { up_to },
                    volume_rate: r,
                    unit_price: tier_unit,
                });
            }
        }
        f.tiers = Some(out.into_boxed_slice());
    }
    f
}

fn usage_name(u: UsageType) -> &'static str {
    match u {
        UsageType::Unit => "unit",
        UsageType::Volume => "volume",
        UsageType::UnitAndVolume => "unit_and_volume",
    }
}

/// Checks the rate fields against usage type and model; builds the engine's `Rates`.
fn build_rates(
    cx: &mut Cx<'_>,
    span: &Span,
    path: &str,
    usage: UsageType,
    model: PricingModel,
    f: &RateFields,
) -> Option<Rates> {
    let before = cx.errors.len();
    let need = |cx: &mut Cx<'_>, present: bool, key: &str, why: &str| {
        if !present {
            cx.err(
                span,
                &join(path, key),
                "missing_rate",
                format!("`{key}` is required {why}"),
            );
        }
    };
    let ctx = format!(
        "for usage_type {} with pricing_model {}",
        usage_name(usage),
        model.as_str()
    );
    // Every tier with its own unit price stands in for the price's.
    let tier_units = f.tiers.as_ref().is_some_and(|t| {
        matches!(model, PricingModel::Tiered | PricingModel::Bulk)
            && t.iter().all(|t| t.unit_price.is_some())
    });
    let any_tier_unit = f
        .tiers
        .as_ref()
        .is_some_and(|t| t.iter().any(|t| t.unit_price.is_some()));
    match usage {
        UsageType::Unit => need(cx, f.unit_price.is_some(), "unit_price", &ctx),
        UsageType::UnitAndVolume => need(
            cx,
            f.unit_price.is_some() || tier_units,
            "unit_price",
            &format!("{ctx} (on the price, or on every tier)"),
        ),
        UsageType::Volume => {}
    }
    if any_tier_unit && usage != UsageType::UnitAndVolume {
        cx.err(
            span,
            &join(path, "tiers"),
            "rate_not_allowed",
            format!(
                "a tier's `unit_price` is used only with usage_type unit_and_volume, not {}",
                usage_name(usage)
            ),
        );
    }
    let forbid = |cx: &mut Cx<'_>, present: bool, key: &str| {
        if present {
            cx.err(
                span,
                &join(path, key),
                "rate_not_allowed",
                format!("`{key}` is not used {ctx}"),
            );
        }
    };
    if usage == UsageType::Volume {
        forbid(cx, f.unit_price.is_some(), "unit_price");
    }
    let volume = if usage == UsageType::Unit {
        forbid(cx, f.volume_rate.is_some(), "volume_rate");
        forbid(cx, f.package_size.is_some(), "package_size");
        forbid(cx, f.tiers.is_some(), "tiers");
        None
    } else {
        let ctx = format!("for pricing_model {}", model.as_str());
        match model {
            PricingModel::Flat | PricingModel::Package => {
                forbid(cx, f.tiers.is_some(), "tiers");
                need(cx, f.volume_rate.is_some(), "volume_rate", &ctx);
                if model == PricingModel::Package {
                    need(cx, f.package_size.is_some(), "package_size", &ctx);
                }
            }
            PricingModel::Tiered | PricingModel::Bulk => {
                forbid(cx, f.volume_rate.is_some(), "volume_rate");
                need(cx, f.tiers.is_some(), "tiers", &ctx);
            }
        }
        if cx.errors.len() > before {
            return None;
        }
        let rate = f.volume_rate.unwrap_or_default();
        Some(match model {
            PricingModel::Flat => VolumePart::Flat {
                rate,
                package_size: f.package_size,
            },
            PricingModel::Package => VolumePart::Package {
                rate,
                package_size: f.package_size.unwrap_or(Decimal::ONE),
            },
            PricingModel::Tiered => VolumePart::Tiered {
                tiers: f.tiers.clone().unwrap_or_default(),
                package_size: f.package_size,
            },
            PricingModel::Bulk => VolumePart::Bulk {
                tiers: f.tiers.clone().unwrap_or_default(),
                package_size: f.package_size,
            },
        })
    };
    if cx.errors.len() > before {
        return None;
    }
    Some(Rates {
        unit_price: f.unit_price,
        volume,
        min_amount: f.min_amount,
        max_amount: f.max_amount,
    })
}

fn parse_price(
    cx: &mut Cx<'_>,
    t: &dyn TableLike,
    span: &Span,
    path: &str,
    assets: &HashMap<String, u32>,
) -> Option<Price> {
    let before = cx.errors.len();
    let mut allowed = vec![
        "id",
        "name",
        "event_type",
        "usage_type",
        "pricing_model",
        "volume_field",
        "asset",
        "dimensions",
        "rows",
        "tiering",
    ];
    allowed.extend(RATE_KEYS);
    check_keys(cx, t, path, &allowed);
    let id = req_str(cx, t, span, path, "id").map(|(v, _)| v);
    if id.as_deref() == Some("") {
        cx.err(
            &key_span(t, "id"),
            &join(path, "id"),
            "invalid_id",
            "price id must not be empty",
        );
    }
    let name = get_str(cx, t, path, "name").ok().flatten().map(|(v, _)| v);
    let event_type = req_str(cx, t, span, path, "event_type").map(|(v, _)| v);
    let usage = match req_str(cx, t, span, path, "usage_type") {
        None => None,
        Some((u, s)) => match u.as_str() {
            "unit" => Some(UsageType::Unit),
            "volume" => Some(UsageType::Volume),
            "unit_and_volume" => Some(UsageType::UnitAndVolume),
            other => {
                cx.err(
                    &s,
                    &join(path, "usage_type"),
                    "unknown_usage_type",
                    format!("unknown usage_type `{other}` (unit, volume, unit_and_volume; `custom` is not supported)"),
                );
                None
            }
        },
    };
    let model = match get_str(cx, t, path, "pricing_model") {
        Ok(None) => Some(PricingModel::Flat),
        Err(()) => None,
        Ok(Some((m, s))) => match m.as_str() {
            "flat" => Some(PricingModel::Flat),
            "tiered" => Some(PricingModel::Tiered),
            "bulk" => Some(PricingModel::Bulk),
            "package" => Some(PricingModel::Package),
            other => {
                cx.err(
                    &s,
                    &join(path, "pricing_model"),
                    "unknown_model",
                    format!("unknown pricing_model `{other}` (flat, tiered, bulk, package)"),
                );
                None
            }
        },
    };
    let tiering = parse_tiering(cx, t, path, model);
    let volume_field = get_str(cx, t, path, "volume_field").ok().flatten();
    if let Some(u) = usage {
        match (&volume_field, u) {
            (None, UsageType::Volume | UsageType::UnitAndVolume) => cx.err(
                span,
                &join(path, "volume_field"),
                "missing_volume_field",
                format!(
                    "usage_type {} needs `volume_field` (the data key holding the quantity)",
                    usage_name(u)
                ),
            ),
            (Some((_, s)), UsageType::Unit) => cx.err(
                s,
                &join(path, "volume_field"),
                "volume_field_not_used",
                "usage_type unit prices per event and reads no volume_field",
            ),
            (Some((f, s)), _) if f.is_empty() => cx.err(
                s,
                &join(path, "volume_field"),
                "missing_volume_field",
                "volume_field must not be empty",
            ),
            _ => {}
        }
        if let (UsageType::Unit, Some(m)) = (u, model) {
            if m != PricingModel::Flat {
                cx.err(
                    &key_span(t, "pricing_model"),
                    &join(path, "pricing_model"),
                    "model_needs_volume",
                    format!("pricing_model {} needs a quantity: use usage_type volume or unit_and_volume", m.as_str()),
                );
            }
        }
    }
    let asset = req_str(cx, t, span, path, "asset");
    let precision = match &asset {
        Some((a, s)) => match assets.get(a) {
            Some(p) => Some(*p),
            None => {
                let mut known: Vec<&str> = assets.keys().map(String::as_str).collect();
                known.sort_unstable();
                cx.err(
                    s,
                    &join(path, "asset"),
                    "unknown_asset",
                    format!("unknown asset `{a}` (declared: {}; declare custom assets in {ASSETS_FILE})", known.join(", ")),
                );
                None
            }
        },
        None => None,
    };
    // Dimensions.
    let mut dimensions: Vec<String> = Vec::new();
    if let Some(item) = t.get("dimensions") {
        let dpath = join(path, "dimensions");
        match item.as_array() {
            Some(arr) => {
                for v in arr.iter() {
                    match v.as_str() {
                        Some(s) if !s.is_empty() && !dimensions.iter().any(|d| d == s) => {
                            dimensions.push(s.to_owned())
                        }
                        _ => cx.err(
                            &v.span(),
                            &dpath,
                            "invalid_dimensions",
                            "dimensions must be distinct, non-empty data keys",
                        ),
                    }
                }
            }
            None => cx.err(
                &item.span(),
                &dpath,
                "wrong_type",
                "dimensions must be an array of data keys",
            ),
        }
    }
    let before_rates = cx.errors.len();
    let defaults = parse_rate_fields(cx, t, path);
    // An invalid rate was reported already; do not also call it missing.
    let defaults_ok = cx.errors.len() == before_rates;
    let mut rows: Vec<(usize, Row, Span)> = Vec::new();
    if let (Some(u), Some(m)) = (usage, model) {
        if dimensions.is_empty() {
            if let Some(item) = t.get("rows") {
                cx.err(
                    &item.span(),
                    &join(path, "rows"),
                    "rows_without_dimensions",
                    "`rows` needs `dimensions`",
                );
            } else if !defaults_ok {
            } else if let Some(rates) = build_rates(cx, span, path, u, m, &defaults) {
                rows.push((
                    0,
                    Row {
                        values: Box::new([]),
                        specificity: 0,
                        rates,
                    },
                    span.clone(),
                ));
            }
        } else {
            let rpath = join(path, "rows");
            match t.get("rows") {
                None => cx.err(
                    span,
                    &rpath,
                    "missing_key",
                    "a price with `dimensions` needs `rows`",
                ),
                Some(item) => {
                    for (ri, (rt, rspan)) in tables(cx, item, &rpath)
                        .unwrap_or_default()
                        .into_iter()
                        .enumerate()
                    {
                        let p = format!("{rpath}[{ri}]");
                        let mut allowed = vec!["dimensions"];
                        allowed.extend(RATE_KEYS);
                        check_keys(cx, rt, &p, &allowed);
                        let values = parse_row_values(cx, rt, &rspan, &p, &dimensions);
                        let before_row = cx.errors.len();
                        let fields = parse_rate_fields(cx, rt, &p).over(&defaults);
                        let rates = if defaults_ok && cx.errors.len() == before_row {
                            build_rates(cx, &rspan, &p, u, m, &fields)
                        } else {
                            None
                        };
                        if let (Some(values), Some(rates)) = (values, rates) {
                            let specificity = values.iter().filter(|v| v.is_some()).count();
                            rows.push((
                                ri,
                                Row {
                                    values,
                                    specificity,
                                    rates,
                                },
                                rspan,
                            ));
                        }
                    }
                    if rows.is_empty() && cx.errors.len() == before {
                        cx.err(
                            &item.span(),
                            &rpath,
                            "missing_rows",
                            "a price with `dimensions` needs at least one row",
                        );
                    }
                }
            }
        }
    }
    // Most specific first; stable, so file order breaks nothing (ties are rejected below).
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.specificity));
    check_ambiguity(cx, path, &dimensions, &rows);
    if cx.errors.len() > before {
        return None;
    }
    Some(Price {
        id: id?.into(),
        name: name.map(Into::into),
        event_type: event_type?,
        usage_type: usage?,
        model: model?,
        volume_field: volume_field.map(|(f, _)| f.into()),
        asset: asset?.0.into(),
        precision: precision?,
        dimensions: dimensions.into_boxed_slice(),
        rows: rows.into_iter().map(|(_, r, _)| r).collect(),
        tiering,
    })
}

/// `tiering = { period = "monthly", basis = "volume" }`: tiers over a running total (tiered
/// and bulk prices only). `basis` defaults to `volume`.
fn parse_tiering(
    cx: &mut Cx<'_>,
    t: &dyn TableLike,
    path: &str,
    model: Option<PricingModel>,
) -> Option<Tiering> {
    let item = t.get("tiering")?;
    let tpath = join(path, "tiering");
    let Some(tt) = item.as_table_like() else {
        cx.err(
            &item.span(),
            &tpath,
            "wrong_type",
            "tiering must be a table: { period = \"monthly\", basis = \"volume\" }",
        );
        return None;
    };
    check_keys(cx, tt, &tpath, &["period", "basis"]);
    let span = table_span(item.span(), tt);
    let period = match req_str(cx, tt, &span, &tpath, "period") {
        None => None,
        Some((p, s)) => match p.as_str() {
            "lifetime" => Some(Period::Lifetime),
            "monthly" => Some(Period::Monthly),
            "quarterly" => Some(Period::Quarterly),
            "yearly" => Some(Period::Yearly),
            other => {
                cx.err(
                    &s,
                    &join(&tpath, "period"),
                    "unknown_period",
                    format!("unknown tiering period `{other}` (lifetime, monthly, quarterly, yearly; `custom` is not supported)"),
                );
                None
            }
        },
    };
    let basis = match get_str(cx, tt, &tpath, "basis") {
        Ok(None) => Some(Basis::Volume),
        Err(()) => None,
        Ok(Some((b, s))) => match b.as_str() {
            "volume" => Some(Basis::Volume),
            "unit" => Some(Basis::Unit),
            other => {
                cx.err(
                    &s,
                    &join(&tpath, "basis"),
                    "unknown_basis",
                    format!("unknown tiering basis `{other}` (volume, unit; `package` and `custom` are not supported)"),
                );
                None
            }
        },
    };
    if let Some(m) = model {
        if !matches!(m, PricingModel::Tiered | PricingModel::Bulk) {
            cx.err(
                &item.span(),
                &tpath,
                "tiering_not_allowed",
                format!(
                    "tiering applies to pricing_model tiered or bulk, not {}",
                    m.as_str()
                ),
            );
            return None;
        }
    }
    Some(Tiering {
        period: period?,
        basis: basis?,
    })
}

fn parse_row_values(
    cx: &mut Cx<'_>,
    rt: &dyn TableLike,
    span: &Span,
    path: &str,
    dimensions: &[String],
) -> Option<Box<[Option<Box<str>>]>> {
    let dpath = join(path, "dimensions");
    let Some(item) = rt.get("dimensions") else {
        cx.err(
            span,
            &dpath,
            "missing_key",
            "a row needs `dimensions = { key = \"value\" | \"*\" }`",
        );
        return None;
    };
    let Some(dt) = item.as_table_like() else {
        cx.err(
            &item.span(),
            &dpath,
            "wrong_type",
            "row dimensions must be a table",
        );
        return None;
    };
    let mut ok = true;
    for (k, _) in dt.iter() {
        if !dimensions.iter().any(|d| d == k) {
            cx.err(
                &key_span(dt, k),
                &join(&dpath, k),
                "invalid_dimensions",
                format!(
                    "`{k}` is not one of the price's dimensions ({})",
                    dimensions.join(", ")
                ),
            );
            ok = false;
        }
    }
    let mut values = Vec::with_capacity(dimensions.len());
    for d in dimensions {
        match dt.get(d) {
            None => {
                cx.err(
                    &item.span(),
                    &join(&dpath, d),
                    "invalid_dimensions",
                    format!("row does not give dimension `{d}` (use \"*\" for any value)"),
                );
                ok = false;
            }
            Some(v) => match v.as_str() {
                Some("*") => values.push(None),
                Some(s) => values.push(Some(Box::from(s))),
                None => {
                    cx.err(
                        &v.span(),
                        &join(&dpath, d),
                        "wrong_type",
                        "dimension values are strings (\"true\", \"2\" match boolean and number data)",
                    );
                    ok = false;
                }
            },
        }
    }
    ok.then(|| values.into_boxed_slice())
}

/// Two rows of equal specificity that can match the same event are ambiguous, unless a strictly
/// more specific row covers every event they both match.
fn check_ambiguity(
    cx: &mut Cx<'_>,
    path: &str,
    dimensions: &[String],
    rows: &[(usize, Row, Span)],
) {
    for (i, (ia, a, _)) in rows.iter().enumerate() {
        for (ib, b, bspan) in rows.iter().skip(i + 1) {
            if a.specificity != b.specificity {
                continue;
            }
            let compatible = a
                .values
                .iter()
                .zip(b.values.iter())
                .all(|(x, y)| x.is_none() || y.is_none() || x == y);
            if !compatible {
                continue;
            }
            let meet: Vec<Option<&str>> = a
                .values
                .iter()
                .zip(b.values.iter())
                .map(|(x, y)| x.as_deref().or(y.as_deref()))
                .collect();
            let covered = rows.iter().any(|(_, r, _)| {
                r.specificity > a.specificity
                    && r.values
                        .iter()
                        .zip(meet.iter())
                        .all(|(rv, m)| rv.is_none() || rv.as_deref() == *m)
            });
            if !covered {
                let example: Vec<String> = dimensions
                    .iter()
                    .zip(meet.iter())
                    .map(|(d, m)| format!("{d}={}", m.unwrap_or("*")))
                    .collect();
                let (lo, hi) = if ia < ib { (ia, ib) } else { (ib, ia) };
                cx.err(
                    bspan,
                    &format!("{path}.rows[{hi}]"),
                    "ambiguous_dimensions",
                    format!(
                        "rows[{lo}] and rows[{hi}] are equally specific and both match {}; add a more specific row or remove one",
                        example.join(", ")
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the whole set

/// Parses and validates `files` (the whole directory) into a set, or returns every mistake.
pub fn build(files: &[SourceFile]) -> Result<PricingSet, LoadErrors> {
    let hash = content_hash(files);
    let mut errors = Vec::new();
    let mut assets: HashMap<String, u32> = money::BUILTIN_ASSETS
        .iter()
        .map(|a| ((*a).to_owned(), money::DEFAULT_FIAT_PRECISION))
        .collect();
    if let Some(f) = files.iter().find(|f| f.name == ASSETS_FILE) {
        let mut cx = Cx {
            file: &f.name,
            text: &f.text,
            errors: &mut errors,
        };
        if let Some(doc) = parse_doc(&mut cx, &f.text) {
            parse_assets(&mut cx, doc.as_table(), &mut assets);
        }
    }
    let mut assignments = None;
    match files.iter().find(|f| f.name == ASSIGNMENTS_FILE) {
        Some(f) => {
            let mut cx = Cx {
                file: &f.name,
                text: &f.text,
                errors: &mut errors,
            };
            if let Some(doc) = parse_doc(&mut cx, &f.text) {
                assignments = Some(parse_assignments(&mut cx, doc.as_table()));
            }
        }
        None => errors.push(LoadError {
            file: ASSIGNMENTS_FILE.into(),
            line: None,
            path: String::new(),
            code: "missing_file",
            message: "the pricing directory needs assignments.toml (default book and tenants)"
                .into(),
        }),
    }
    let mut book_names: HashSet<String> = HashSet::new();
    let mut raws: HashMap<String, RawBook> = HashMap::new();
    for f in files {
        if f.name == ASSETS_FILE || f.name == ASSIGNMENTS_FILE {
            continue;
        }
        let name = f.name.trim_end_matches(".toml").to_owned();
        book_names.insert(name.clone());
        let mut cx = Cx {
            file: &f.name,
            text: &f.text,
            errors: &mut errors,
        };
        if let Some(doc) = parse_doc(&mut cx, &f.text) {
            if let Some(book) = parse_book(&mut cx, doc.as_table(), &assets) {
                raws.insert(name, book);
            }
        }
    }
    // Cross-file references.
    let unknown_book = |file: &str, line: Option<usize>, path: String, book: &str| LoadError {
        file: file.to_owned(),
        line,
        path,
        code: "unknown_book",
        message: format!("unknown book `{book}` (no {book}.toml in the pricing directory)"),
    };
    let mut names: Vec<&String> = raws.keys().collect();
    names.sort();
    for name in &names {
        let raw = &raws[*name];
        if let Some((parent, line)) = &raw.extends {
            if !book_names.contains(parent) {
                errors.push(unknown_book(&raw.file, *line, "extends".into(), parent));
            } else {
                // Walk the chain; a cycle comes back to `name`.
                let mut seen = BTreeSet::new();
                let mut cur = Some(parent.clone());
                while let Some(c) = cur {
                    if &c == *name {
                        errors.push(LoadError {
                            file: raw.file.clone(),
                            line: *line,
                            path: "extends".into(),
                            code: "extends_cycle",
                            message: format!(
                                "`extends` chain of book `{name}` loops back to itself"
                            ),
                        });
                        break;
                    }
                    if !seen.insert(c.clone()) {
                        break; // a cycle elsewhere, reported on its own books
                    }
                    cur = raws
                        .get(&c)
                        .and_then(|r| r.extends.as_ref().map(|(p, _)| p.clone()));
                }
            }
        }
    }
    if let Some(a) = &assignments {
        if let Some((book, line)) = &a.default {
            if !book_names.contains(book) {
                errors.push(unknown_book(
                    ASSIGNMENTS_FILE,
                    *line,
                    "default".into(),
                    book,
                ));
            }
        }
        for (tenant, book, line) in &a.tenants {
            if !book_names.contains(book) {
                errors.push(unknown_book(
                    ASSIGNMENTS_FILE,
                    *line,
                    format!("tenants.{tenant}"),
                    book,
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    let Some(assignments) = assignments else {
        return Err(LoadErrors(errors));
    };
    let mut resolved: HashMap<String, Arc<ResolvedBook>> = HashMap::new();
    for name in &names {
        resolve(name, &raws, &mut resolved);
    }
    let pick = |book: &str| resolved.get(book).cloned();
    let tenants = assignments
        .tenants
        .iter()
        .filter_map(|(t, b, _)| pick(b).map(|r| (t.clone(), r)))
        .collect();
    let default = assignments.default.as_ref().and_then(|(b, _)| pick(b));
    let version = match &assignments.version {
        Some(v) => format!("{v}+{}", &hash[..12]),
        None => hash[..12].to_owned(),
    };
    Ok(PricingSet {
        books: resolved,
        tenants,
        default,
        hash: hash.into(),
        version,
    })
}

/// A book's timeline with its parents' prices merged in (own prices replace the parent's by id).
fn resolve(
    name: &str,
    raws: &HashMap<String, RawBook>,
    memo: &mut HashMap<String, Arc<ResolvedBook>>,
) -> Option<Arc<ResolvedBook>> {
    if let Some(r) = memo.get(name) {
        return Some(r.clone());
    }
    let raw = raws.get(name)?;
    let parent = match &raw.extends {
        Some((p, _)) => Some(resolve(p, raws, memo)?),
        None => None,
    };
    let mut instants: Vec<DateTime<Utc>> = raw.versions.iter().map(|v| v.effective_from).collect();
    if let Some(p) = &parent {
        instants.extend(p.timeline.iter().map(|v| v.effective_from));
    }
    instants.sort();
    instants.dedup();
    let mut timeline = Vec::with_capacity(instants.len());
    for at in instants {
        let own = raw.versions.iter().rev().find(|v| v.effective_from <= at);
        let inherited = parent
            .as_ref()
            .and_then(|p| p.version_at(at).map(|v| (p, v)));
        let mut prices: Vec<Arc<Price>> = inherited
            .map(|(_, v)| v.prices.to_vec())
            .unwrap_or_default();
        // Parent prices in their order, own prices replace them in place or follow.
        if let Some(own) = own {
            for p in &own.prices {
                match prices.iter_mut().find(|q| q.id == p.id) {
                    Some(slot) => *slot = p.clone(),
                    None => prices.push(p.clone()),
                }
            }
        }
        let own_label = own.map_or("-", |v| v.label.as_str());
        let label = match inherited {
            Some((p, v)) => format!("{own_label}+{}@{}", p.name, v.label),
            None => own_label.to_owned(),
        };
        let mut by_event: HashMap<String, Vec<Arc<Price>>> = HashMap::new();
        for p in &prices {
            by_event
                .entry(p.event_type.clone())
                .or_default()
                .push(p.clone());
        }
        timeline.push(ResolvedVersion {
            effective_from: at,
            label: label.into(),
            prices: prices.into_boxed_slice(),
            by_event: by_event
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect(),
        });
    }
    let book = Arc::new(ResolvedBook {
        name: name.into(),
        timeline: timeline.into_boxed_slice(),
    });
    memo.insert(name.to_owned(), book.clone());
    Some(book)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn files(book: &str) -> Vec<SourceFile> {
        vec![
            SourceFile {
                name: ASSIGNMENTS_FILE.into(),
                text: "default = \"b\"\n".into(),
            },
            SourceFile {
                name: "b.toml".into(),
                text: book.into(),
            },
        ]
    }

    #[test]
    fn toml_numbers_are_read_from_their_literal_text() {
        let set = build(&files(
            r#"[[versions]]
effective_from = 2026-01-01T00:00:00Z
[[versions.prices]]
id = "p"
event_type = "e"
usage_type = "volume"
volume_field = "q"
asset = "USD"
pricing_model = "tiered"
package_size = 1.000_000_000_000_000_001
tiers = [
  { up_to = 9007199254740993, volume_rate = 1.005 },
  { up_to = "9007199254740994.5", volume_rate = 0.1 },
  { volume_rate = 2.5e-7 },
]
"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let book = set.book("b").unwrap();
        let price = &book.timeline[0].prices[0];
        let VolumePart::Tiered {
            tiers,
            package_size,
        } = price.rows[0].rates.volume.clone().unwrap()
        else {
            panic!("not tiered")
        };
        assert_eq!(package_size, Some(dec!(1.000000000000000001)));
        assert_eq!(
            tiers[0].up_to,
            Some(Decimal::from(9_007_199_254_740_993_i64))
        );
        assert_eq!(tiers[0].volume_rate, dec!(1.005));
        assert_eq!(tiers[1].up_to, Some(dec!(9007199254740994.5)));
        assert_eq!(tiers[2].volume_rate, dec!(0.00000025));
    }

    #[test]
    fn rows_are_sorted_most_specific_first() {
        let set = build(&files(
            r#"[[versions]]
effective_from = 2026-01-01T00:00:00Z
[[versions.prices]]
id = "p"
event_type = "e"
usage_type = "unit"
asset = "USD"
unit_price = 1
dimensions = ["a", "b"]
rows = [
  { dimensions = { a = "*", b = "*" } },
  { dimensions = { a = "x", b = "y" }, unit_price = 3 },
  { dimensions = { a = "x", b = "*" }, unit_price = 2 },
]
"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let price = &set.book("b").unwrap().timeline[0].prices[0];
        let specs: Vec<usize> = price.rows.iter().map(|r| r.specificity).collect();
        assert_eq!(specs, vec![2, 1, 0]);
        assert_eq!(price.rows[2].rates.unit_price, Some(dec!(1)));
    }

    fn price(body: &str) -> String {
        format!(
            "[[versions]]\neffective_from = 2026-01-01T00:00:00Z\n[[versions.prices]]\nid = \"p\"\nevent_type = \"e\"\nasset = \"USD\"\n{body}"
        )
    }

    fn codes(book: &str) -> Vec<&'static str> {
        match build(&files(book)) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors().iter().map(|e| e.code()).collect(),
        }
    }

    #[test]
    fn tiering_unit_prices_per_tier_and_bounds_are_validated() {
        let tiered = "usage_type = \"volume\"\nvolume_field = \"q\"\npricing_model = \"tiered\"\ntiers = [{ up_to = 10, volume_rate = 1 }, { volume_rate = 0.5 }]\n";
        // Accepted: every period and basis, basis defaulting to volume.
        for t in [
            "tiering = { period = \"monthly\" }",
            "tiering = { period = \"quarterly\", basis = \"unit\" }",
            "tiering = { period = \"yearly\", basis = \"volume\" }",
            "tiering = { period = \"lifetime\" }",
        ] {
            assert_eq!(
                codes(&price(&format!("{tiered}{t}\n"))),
                Vec::<&str>::new(),
                "{t}"
            );
        }
        let set = build(&files(&price(&format!(
            "{tiered}tiering = {{ period = \"monthly\" }}\n"
        ))))
        .unwrap();
        assert!(set.has_period_tiers());
        let p = &set.book("b").unwrap().timeline[0].prices[0];
        assert_eq!(
            p.tiering,
            Some(Tiering {
                period: Period::Monthly,
                basis: Basis::Volume
            })
        );
        assert!(!build(&files(&price(tiered))).unwrap().has_period_tiers());
        // Refused: an unknown period or basis, a key too many, tiering on a flat price.
        assert_eq!(
            codes(&price(&format!(
                "{tiered}tiering = {{ period = \"custom\" }}\n"
            ))),
            vec!["unknown_period"]
        );
        assert_eq!(
            codes(&price(&format!(
                "{tiered}tiering = {{ period = \"monthly\", basis = \"package\" }}\n"
            ))),
            vec!["unknown_basis"]
        );
        assert_eq!(
            codes(&price(&format!(
                "{tiered}tiering = {{ period = \"monthly\", reset = 1 }}\n"
            ))),
            vec!["unknown_key"]
        );
        assert_eq!(
            codes(&price("usage_type = \"volume\"\nvolume_field = \"q\"\nvolume_rate = 1\ntiering = { period = \"monthly\" }\n")),
            vec!["tiering_not_allowed"]
        );
        assert_eq!(
            codes(&price(&format!(
                "{tiered}tiering = {{ basis = \"unit\" }}\n"
            ))),
            vec!["missing_key"]
        );
        // A tier's unit price: only on unit_and_volume, where it may stand in for the price's.
        assert_eq!(
            codes(&price("usage_type = \"volume\"\nvolume_field = \"q\"\npricing_model = \"bulk\"\ntiers = [{ up_to = 10, volume_rate = 1, unit_price = 2 }, { volume_rate = 0.5 }]\n")),
            vec!["rate_not_allowed"]
        );
        assert_eq!(
            codes(&price("usage_type = \"unit_and_volume\"\nvolume_field = \"q\"\npricing_model = \"bulk\"\ntiers = [{ up_to = 10, volume_rate = 1, unit_price = 2 }, { volume_rate = 0.5, unit_price = 1 }]\n")),
            Vec::<&str>::new()
        );
        assert_eq!(
            codes(&price("usage_type = \"unit_and_volume\"\nvolume_field = \"q\"\npricing_model = \"bulk\"\ntiers = [{ up_to = 10, volume_rate = 1, unit_price = 2 }, { volume_rate = 0.5 }]\n")),
            vec!["missing_rate"]
        );
        assert_eq!(
            codes(&price("usage_type = \"unit_and_volume\"\nvolume_field = \"q\"\npricing_model = \"bulk\"\ntiers = [{ up_to = 10, volume_rate = 1, unit_price = -2 }, { volume_rate = 0.5 }]\nunit_price = 1\n")),
            vec!["negative_price"]
        );
        // Floor and cap: non-negative, the floor not above the cap; on any model.
        assert_eq!(
            codes(&price(
                "usage_type = \"unit\"\nunit_price = 1\nmin_amount = 0.5\nmax_amount = 2\n"
            )),
            Vec::<&str>::new()
        );
        assert_eq!(
            codes(&price(
                "usage_type = \"unit\"\nunit_price = 1\nmin_amount = 3\nmax_amount = 2\n"
            )),
            vec!["min_above_max"]
        );
        assert_eq!(
            codes(&price(
                "usage_type = \"unit\"\nunit_price = 1\nmax_amount = -1\n"
            )),
            vec!["negative_price"]
        );
    }

    #[test]
    fn duplicate_effective_from_and_duplicate_rows_are_errors() {
        let errors = build(&files(
            r#"[[versions]]
effective_from = 2026-01-01T00:00:00Z
prices = []
[[versions]]
effective_from = "2026-01-01T01:00:00+01:00"
[[versions.prices]]
id = "p"
event_type = "e"
usage_type = "unit"
asset = "USD"
unit_price = 1
dimensions = ["a"]
rows = [ { dimensions = { a = "x" } }, { dimensions = { a = "x" } } ]
"#,
        ))
        .unwrap_err();
        let codes: Vec<&str> = errors.errors().iter().map(|e| e.code()).collect();
        assert!(codes.contains(&"duplicate_effective_from"), "{errors}");
        assert!(codes.contains(&"ambiguous_dimensions"), "{errors}");
    }

    #[test]
    fn most_specific_row_wins_in_every_order() {
        use crate::domain::{DataValue, EventData, EventId, UsageEvent};
        let rows = [
            ("{ model = \"*\", region = \"*\" }", "1"),
            ("{ model = \"gpt-4o\", region = \"*\" }", "2"),
            ("{ model = \"*\", region = \"eu\" }", "3"),
            ("{ model = \"gpt-4o\", region = \"eu\" }", "4"),
        ];
        let cases = [
            ("gpt-4o", "eu", dec!(4)),
            ("gpt-4o", "us", dec!(2)),
            ("mini", "eu", dec!(3)),
            ("mini", "us", dec!(1)),
        ];
        // Every permutation of the four rows (Heap's algorithm, iteratively).
        let mut order = [0usize, 1, 2, 3];
        let mut c = [0usize; 4];
        let mut perms = vec![order];
        let mut i = 0;
        while i < 4 {
            if c[i] < i {
                if i % 2 == 0 {
                    order.swap(0, i)
                } else {
                    order.swap(c[i], i)
                }
                perms.push(order);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        assert_eq!(perms.len(), 24);
        for perm in perms {
            let listed: Vec<String> = perm
                .iter()
                .map(|&r| {
                    format!(
                        "  {{ dimensions = {}, unit_price = {} }},",
                        rows[r].0, rows[r].1
                    )
                })
                .collect();
            let book = format!(
                "[[versions]]\neffective_from = 2026-01-01T00:00:00Z\n[[versions.prices]]\nid = \"p\"\nevent_type = \"e\"\nusage_type = \"unit\"\nasset = \"USD\"\ndimensions = [\"model\", \"region\"]\nrows = [\n{}\n]\n",
                listed.join("\n")
            );
            let set = build(&files(&book)).unwrap_or_else(|e| panic!("{e}"));
            for (model, region, want) in cases {
                let mut data = EventData::new();
                data.insert("model".into(), DataValue::String(model.into()));
                data.insert("region".into(), DataValue::String(region.into()));
                let event = UsageEvent {
                    id: EventId::from("x"),
                    event_type: "e".into(),
                    occurred_at: DateTime::parse_from_rfc3339("2026-02-01T00:00:00Z")
                        .unwrap()
                        .with_timezone(&Utc),
                    subject: None,
                    description: None,
                    data,
                };
                let fees = set.price("t", &event).unwrap();
                assert_eq!(fees[0].amount, want, "order {perm:?}, {model}/{region}");
            }
        }
    }
}
