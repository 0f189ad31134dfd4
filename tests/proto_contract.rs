//! The wire contract: `proto/csi.proto` must compile to exactly the same
//! descriptor as the upstream CSI v1.12.0 `csi.proto` (comments and layout
//! aside). Both files are compiled with protox; the `csi.proto`
//! FileDescriptorProto of each, with `source_code_info` cleared, is decoded
//! dynamically (so custom options such as `(csi_secret)` and
//! `(alpha_field)` are compared too, which `prost_types` would drop) and the
//! encodings must be byte-identical.
//!
//! The upstream file is read from `../shared/reference/csi.proto` relative to
//! the crate, or from the path in `STOWAGE_REFERENCE_PROTO`. A missing
//! reference is a failure, never a skip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use protox::prost::Message as _;
use protox::prost_reflect::{DynamicMessage, Value};

const PROTO_NAME: &str = "csi.proto";

/// The compiled `csi.proto` descriptor, source info removed.
struct Contract {
    /// The FileDescriptorProto, decoded with the compiled pool so extension
    /// options are known fields.
    file: DynamicMessage,
    /// Its encoding (fields in number order, deterministic).
    bytes: Vec<u8>,
}

fn project_proto() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto")
        .join(PROTO_NAME)
}

fn reference_proto() -> PathBuf {
    match std::env::var_os("STOWAGE_REFERENCE_PROTO") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("shared")
            .join("reference")
            .join(PROTO_NAME),
    }
}

/// Compiles `dir/csi.proto` (include path `dir`, plus protox's bundled
/// google/protobuf files).
fn compile_dir(dir: &Path) -> Result<Contract, String> {
    let mut compiler = protox::Compiler::new([dir])
        .map_err(|e| format!("protox include path {}: {e}", dir.display()))?;
    compiler.include_imports(false).include_source_info(false);
    compiler
        .open_file(dir.join(PROTO_NAME))
        .map_err(|e| format!("compile {}: {e:?}", dir.join(PROTO_NAME).display()))?;
    let pool = compiler.descriptor_pool();
    let file = pool
        .get_file_by_name(PROTO_NAME)
        .ok_or_else(|| format!("{PROTO_NAME} missing from the compiled pool"))?;
    let fdp = pool
        .get_message_by_name("google.protobuf.FileDescriptorProto")
        .ok_or("google.protobuf.FileDescriptorProto missing from the pool")?;
    let mut file = DynamicMessage::decode(fdp, file.encode_to_vec().as_slice())
        .map_err(|e| format!("decode FileDescriptorProto: {e}"))?;
    file.clear_field_by_name("source_code_info");
    let bytes = file.encode_to_vec();
    Ok(Contract { file, bytes })
}

/// Compiles the given proto file. A file not named `csi.proto` is copied
/// into a temporary directory under that name first, so the descriptor's
/// `name` field is comparable.
fn compile_path(path: &Path) -> Result<Contract, String> {
    if path.file_name().is_some_and(|n| n == PROTO_NAME) {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        compile_dir(dir)
    } else {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        compile_text(&text)
    }
}

/// Compiles proto source text written to a fresh temporary `csi.proto`.
fn compile_text(text: &str) -> Result<Contract, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::write(tmp.path().join(PROTO_NAME), text)
        .map_err(|e| format!("write temporary {PROTO_NAME}: {e}"))?;
    compile_dir(tmp.path())
}

fn list(msg: &DynamicMessage, field: &str) -> Vec<DynamicMessage> {
    match msg.get_field_by_name(field).as_deref() {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|v| v.as_message().cloned())
            .collect(),
        _ => Vec::new(),
    }
}

fn string(msg: &DynamicMessage, field: &str) -> String {
    msg.get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Adds `message <full name>` (without its fields and nested types), one
/// `field <full name>` section per field and, recursively, its nested
/// messages and enums.
fn add_message(out: &mut Vec<(String, String)>, scope: &str, msg: &DynamicMessage) {
    let full = format!("{scope}.{}", string(msg, "name"));
    let mut shallow = msg.clone();
    shallow.clear_field_by_name("field");
    shallow.clear_field_by_name("nested_type");
    shallow.clear_field_by_name("enum_type");
    out.push((format!("message {full}"), format!("{shallow:#}")));
    for f in list(msg, "field") {
        out.push((
            format!("field {full}.{}", string(&f, "name")),
            format!("{f:#}"),
        ));
    }
    for nested in list(msg, "nested_type") {
        add_message(out, &full, &nested);
    }
    for e in list(msg, "enum_type") {
        out.push((
            format!("enum {full}.{}", string(&e, "name")),
            format!("{e:#}"),
        ));
    }
}

/// Splits a file descriptor into named sections in declaration order, each
/// rendered in protobuf text format (with extension options resolved).
fn sections(file: &DynamicMessage) -> Vec<(String, String)> {
    let package = format!(".{}", string(file, "package"));
    let mut header = file.clone();
    for f in ["message_type", "enum_type", "service", "extension"] {
        header.clear_field_by_name(f);
    }
    let mut out = vec![("file header".to_owned(), format!("{header:#}"))];
    for m in list(file, "message_type") {
        add_message(&mut out, &package, &m);
    }
    for e in list(file, "enum_type") {
        out.push((
            format!("enum {package}.{}", string(&e, "name")),
            format!("{e:#}"),
        ));
    }
    for s in list(file, "service") {
        out.push((
            format!("service {package}.{}", string(&s, "name")),
            format!("{s:#}"),
        ));
    }
    for x in list(file, "extension") {
        out.push((
            format!(
                "extension {} of {}",
                string(&x, "name"),
                string(&x, "extendee")
            ),
            format!("{x:#}"),
        ));
    }
    out
}

/// A minimal line diff (LCS) of two small texts, `-` for `a`, `+` for `b`,
/// unchanged lines omitted.
fn line_diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            let _ = writeln!(out, "    + {}", b[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "    - {}", a[i]);
            i += 1;
        }
    }
    out
}

/// Describes how two descriptors differ; `None` when they are identical.
fn describe_difference(project: &Contract, reference: &Contract) -> Option<String> {
    if project.bytes == reference.bytes {
        return None;
    }
    let ps = sections(&project.file);
    let rs = sections(&reference.file);
    let pm: BTreeMap<&str, &str> = ps.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let rm: BTreeMap<&str, &str> = rs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut report = String::from(
        "proto/csi.proto does not match the upstream CSI v1.12.0 descriptor \
         (- project, + reference):\n",
    );
    for (name, text) in &rm {
        match pm.get(name) {
            None => {
                let _ = writeln!(report, "  {name}: missing from proto/csi.proto");
            }
            Some(p) if p != text => {
                let _ = writeln!(report, "  {name} differs:\n{}", line_diff(p, text));
            }
            Some(_) => {}
        }
    }
    for name in pm.keys().filter(|k| !rm.contains_key(*k)) {
        let _ = writeln!(report, "  {name}: not in the upstream file");
    }
    let p_order: Vec<&str> = ps.iter().map(|(k, _)| k.as_str()).collect();
    let r_order: Vec<&str> = rs.iter().map(|(k, _)| k.as_str()).collect();
    if p_order != r_order {
        let _ = writeln!(
            report,
            "  declaration order differs:\n{}",
            line_diff(&p_order.join("\n"), &r_order.join("\n"))
        );
    }
    if pm == rm && p_order == r_order {
        let _ = writeln!(
            report,
            "  (no section differs in text format; the encodings differ in \
             {} vs {} bytes, e.g. unknown fields)",
            project.bytes.len(),
            reference.bytes.len()
        );
    }
    Some(report)
}

fn compile_project() -> Contract {
    compile_path(&project_proto()).unwrap_or_else(|e| panic!("project proto: {e}"))
}

fn compile_reference() -> Contract {
    let path = reference_proto();
    assert!(
        path.is_file(),
        "the upstream CSI v1.12.0 reference proto is missing at {} \
         (set STOWAGE_REFERENCE_PROTO to its path); the wire contract cannot \
         be checked without it",
        path.display()
    );
    compile_path(&path).unwrap_or_else(|e| panic!("reference proto {}: {e}", path.display()))
}

fn project_text() -> String {
    std::fs::read_to_string(project_proto())
        .unwrap_or_else(|e| panic!("read {}: {e}", project_proto().display()))
}

/// Replaces the single occurrence of `from` inside the body of
/// `message <message> { ... }` (up to its first closing brace).
fn replace_in_message(text: &str, message: &str, from: &str, to: &str) -> String {
    let head = format!("message {message} {{");
    let start = text
        .find(&head)
        .unwrap_or_else(|| panic!("`{head}` not found in proto/csi.proto"));
    let end = start
        + text[start..]
            .find('}')
            .unwrap_or_else(|| panic!("`{head}` has no closing brace"));
    let body = &text[start..end];
    assert_eq!(
        body.matches(from).count(),
        1,
        "expected exactly one `{from}` in message {message}"
    );
    format!(
        "{}{}{}",
        &text[..start],
        body.replacen(from, to, 1),
        &text[end..]
    )
}

#[test]
fn project_proto_matches_upstream_csi_v1_12_0() {
    let reference = compile_reference();
    let project = compile_project();
    // Guard against a vacuous comparison: the descriptor must really be CSI
    // and carry the custom options.
    assert_eq!(string(&reference.file, "package"), "csi.v1");
    assert!(
        list(&reference.file, "service").len() >= 3,
        "reference has Identity, Controller, Node services (and more)"
    );
    let rendered = format!("{}", reference.file);
    assert!(
        rendered.contains("csi_secret") && rendered.contains("alpha_field"),
        "extension options must be part of the compared descriptor"
    );
    if let Some(report) = describe_difference(&project, &reference) {
        panic!("{report}");
    }
}

#[test]
fn changed_field_number_is_detected() {
    let reference = compile_reference();
    let original = project_text();
    let mutated = replace_in_message(
        &original,
        "GetPluginInfoResponse",
        "vendor_version = 2;",
        "vendor_version = 7;",
    );
    assert_ne!(mutated, original);
    let mutated = compile_text(&mutated).unwrap_or_else(|e| panic!("mutated proto: {e}"));
    let report = describe_difference(&mutated, &reference)
        .expect("a changed field number must make the descriptors differ");
    assert!(
        report.contains("field .csi.v1.GetPluginInfoResponse.vendor_version differs"),
        "the report names the changed field:\n{report}"
    );
    assert!(
        report.contains("number: 7") && report.contains("number: 2"),
        "the report shows both field numbers:\n{report}"
    );
    // Only that message differs.
    assert_eq!(report.matches(" differs:").count(), 1, "{report}");
}

#[test]
fn dropped_custom_option_is_detected() {
    // prost_types drops extension options; this proves they are compared.
    let reference = compile_reference();
    let original = project_text();
    let mutated = replace_in_message(
        &original,
        "CreateVolumeRequest",
        " [(csi_secret) = true];",
        ";",
    );
    let mutated = compile_text(&mutated).unwrap_or_else(|e| panic!("mutated proto: {e}"));
    let report = describe_difference(&mutated, &reference)
        .expect("a dropped (csi_secret) option must make the descriptors differ");
    assert!(
        report.contains("field .csi.v1.CreateVolumeRequest.secrets differs"),
        "{report}"
    );
    assert!(report.contains("csi_secret"), "{report}");
}
