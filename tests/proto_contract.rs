//! The wire contract: `proto/csi.proto` must compile to exactly the
//! descriptor of the upstream CSI v1.12.0 `csi.proto` (comments and layout
//! aside).
//!
//! The upstream descriptor is committed as `proto/csi-v1.12.0.fingerprint`,
//! so the check needs nothing outside the repository: the `csi.proto`
//! FileDescriptorProto that protox compiles from the upstream file, with
//! `source_code_info` cleared, decoded dynamically (so custom options such
//! as `(csi_secret)` and `(alpha_field)` are compared too, which
//! `prost_types` would drop), written as one protobuf-text-format section
//! per declaration, after an FNV-1a hash of its encoding. `proto/csi.proto`,
//! compiled the same way, must give the same hash and the same sections;
//! a difference is reported section by section.
//!
//! Where the upstream file is at hand (`../shared/reference/csi.proto`
//! beside the crate, or the path in `STOWAGE_REFERENCE_PROTO`), the
//! committed fingerprint must also be exactly the one it gives, so a stale
//! or hand-edited fingerprint fails. `scripts/proto-fingerprint.sh`
//! regenerates the file from there (it runs that test with
//! `STOWAGE_WRITE_FINGERPRINT=1`). A `STOWAGE_REFERENCE_PROTO` that names a
//! missing file is a failure, never a skip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use protox::prost::Message as _;
use protox::prost_reflect::{DynamicMessage, Value};

const PROTO_NAME: &str = "csi.proto";
const FINGERPRINT_NAME: &str = "csi-v1.12.0.fingerprint";
/// Starts each section of a fingerprint file (never the start of a line of
/// protobuf text format).
const SECTION_MARK: &str = "== ";
const HASH_KEY: &str = "fingerprint: ";

/// The compiled `csi.proto` descriptor, source info removed.
struct Contract {
    /// The FileDescriptorProto, decoded with the compiled pool so extension
    /// options are known fields.
    file: DynamicMessage,
    /// Its encoding (fields in number order, deterministic).
    bytes: Vec<u8>,
}

/// A descriptor's comparable form: what the fingerprint file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    /// `fnv1a64 <16 hex digits>, <n> bytes` of the encoding.
    hash: String,
    /// (section name, its text format) in declaration order.
    sections: Vec<(String, String)>,
}

fn project_proto() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto")
        .join(PROTO_NAME)
}

fn fingerprint_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto")
        .join(FINGERPRINT_NAME)
}

/// The upstream file: `Ok(Some)` where it is, `Ok(None)` when the default
/// location holds nothing, `Err` when `STOWAGE_REFERENCE_PROTO` names a
/// file that is not there.
fn reference_proto() -> Result<Option<PathBuf>, String> {
    match std::env::var_os("STOWAGE_REFERENCE_PROTO") {
        Some(p) if !p.is_empty() => {
            let path = PathBuf::from(p);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(format!(
                    "STOWAGE_REFERENCE_PROTO={} is not a file",
                    path.display()
                ))
            }
        }
        _ => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("shared")
                .join("reference")
                .join(PROTO_NAME);
            Ok(path.is_file().then_some(path))
        }
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

/// FNV-1a, 64 bits: a dependency-free digest of the encoding (the sections
/// carry the content; this catches anything text format does not show).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn fingerprint(contract: &Contract) -> Fingerprint {
    Fingerprint {
        hash: format!(
            "fnv1a64 {:016x}, {} bytes",
            fnv1a64(&contract.bytes),
            contract.bytes.len()
        ),
        sections: sections(&contract.file),
    }
}

/// The fingerprint file's text: a comment header, the hash line, then each
/// section as a `== <name>` line followed by its text format.
fn render(fp: &Fingerprint) -> String {
    let mut out = String::from(
        "# The CSI v1.12.0 wire contract: the descriptor protox compiles from the\n\
         # upstream csi.proto (source info removed), one protobuf text format\n\
         # section per declaration. tests/proto_contract.rs requires\n\
         # proto/csi.proto to compile to exactly this. Generated by\n\
         # scripts/proto-fingerprint.sh from ../shared/reference/csi.proto;\n\
         # do not edit.\n",
    );
    let _ = writeln!(out, "{HASH_KEY}{}", fp.hash);
    for (name, text) in &fp.sections {
        let _ = writeln!(out, "{SECTION_MARK}{name}");
        for line in text.lines() {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// Reads a fingerprint file; anything but comments before the hash line,
/// a missing hash, text outside a section, an empty or repeated section is
/// an error (so a damaged file cannot compare equal by accident).
fn parse(text: &str) -> Result<Fingerprint, String> {
    let mut hash: Option<String> = None;
    let mut sections: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if let Some(name) = line.strip_prefix(SECTION_MARK) {
            if hash.is_none() {
                return Err(format!("line {n}: section before the `{HASH_KEY}` line"));
            }
            if let Some((prev, body)) = sections.last()
                && body.is_empty()
            {
                return Err(format!("section {prev} is empty"));
            }
            if sections.iter().any(|(s, _)| s == name) {
                return Err(format!("line {n}: section {name} appears twice"));
            }
            sections.push((name.to_owned(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(line);
        } else if let Some(h) = line.strip_prefix(HASH_KEY) {
            if hash.replace(h.to_owned()).is_some() {
                return Err(format!("line {n}: a second `{HASH_KEY}` line"));
            }
        } else if !(line.starts_with('#') || line.trim().is_empty()) {
            return Err(format!("line {n}: text outside a section: {line:?}"));
        }
    }
    let hash = hash.ok_or_else(|| format!("no `{HASH_KEY}` line"))?;
    match sections.last() {
        None => return Err("no sections".to_owned()),
        Some((name, body)) if body.is_empty() => return Err(format!("section {name} is empty")),
        Some(_) => {}
    }
    Ok(Fingerprint { hash, sections })
}

/// The committed fingerprint, parsed.
fn committed() -> Fingerprint {
    let path = fingerprint_path();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Describes how `actual` differs from `expected` (- actual, + expected);
/// `None` when they are identical.
fn describe_difference(actual: &Fingerprint, expected: &Fingerprint) -> Option<String> {
    if actual == expected {
        return None;
    }
    let am: BTreeMap<&str, &str> = actual
        .sections
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let em: BTreeMap<&str, &str> = expected
        .sections
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut report = String::new();
    for (name, text) in &em {
        match am.get(name) {
            None => {
                let _ = writeln!(report, "  {name}: missing");
            }
            Some(a) if a != text => {
                let _ = writeln!(report, "  {name} differs:\n{}", line_diff(a, text));
            }
            Some(_) => {}
        }
    }
    for name in am.keys().filter(|k| !em.contains_key(*k)) {
        let _ = writeln!(report, "  {name}: not in CSI v1.12.0");
    }
    let a_order: Vec<&str> = actual.sections.iter().map(|(k, _)| k.as_str()).collect();
    let e_order: Vec<&str> = expected.sections.iter().map(|(k, _)| k.as_str()).collect();
    if a_order != e_order {
        let _ = writeln!(
            report,
            "  declaration order differs:\n{}",
            line_diff(&a_order.join("\n"), &e_order.join("\n"))
        );
    }
    if actual.hash != expected.hash {
        let _ = writeln!(
            report,
            "  encoding: {} (expected {}){}",
            actual.hash,
            expected.hash,
            if am == em && a_order == e_order {
                "; no section differs in text format (e.g. unknown fields)"
            } else {
                ""
            }
        );
    }
    Some(report)
}

fn compile_project() -> Fingerprint {
    fingerprint(&compile_path(&project_proto()).unwrap_or_else(|e| panic!("project proto: {e}")))
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

/// `fp` with the single `from` in section `name` replaced by `to`.
fn edit_section(fp: &Fingerprint, name: &str, from: &str, to: &str) -> Fingerprint {
    let mut fp = fp.clone();
    let (_, body) = fp
        .sections
        .iter_mut()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no section {name}"));
    assert_eq!(body.matches(from).count(), 1, "one `{from}` in {name}");
    *body = body.replacen(from, to, 1);
    fp
}

#[test]
fn project_proto_matches_committed_csi_v1_12_0_fingerprint() {
    let expected = committed();
    // Guard against a vacuous comparison: the fingerprint must really be
    // CSI and carry the custom options.
    let header = &expected.sections[0];
    assert_eq!(header.0, "file header");
    assert!(header.1.contains("package: \"csi.v1\""), "{}", header.1);
    let services = expected
        .sections
        .iter()
        .filter(|(n, _)| n.starts_with("service "))
        .count();
    assert!(
        services >= 3,
        "Identity, Controller, Node services (and more)"
    );
    let all: String = expected.sections.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        all.contains("csi_secret") && all.contains("alpha_field"),
        "extension options must be part of the compared descriptor"
    );
    if let Some(report) = describe_difference(&compile_project(), &expected) {
        panic!(
            "proto/csi.proto does not match the upstream CSI v1.12.0 descriptor \
             in proto/{FINGERPRINT_NAME} (- project, + upstream):\n{report}"
        );
    }
}

/// Where the upstream file is at hand, the committed fingerprint is exactly
/// its own: a stale or hand-edited fingerprint fails here. With
/// `STOWAGE_WRITE_FINGERPRINT=1` (`scripts/proto-fingerprint.sh`) the file
/// is written instead.
#[test]
fn committed_fingerprint_is_the_upstream_references() {
    let reference = reference_proto().unwrap_or_else(|e| panic!("{e}"));
    let write = std::env::var_os("STOWAGE_WRITE_FINGERPRINT").is_some_and(|v| v == "1");
    let Some(reference) = reference else {
        assert!(
            !write,
            "STOWAGE_WRITE_FINGERPRINT=1 needs the upstream csi.proto at \
             ../shared/reference/csi.proto or in STOWAGE_REFERENCE_PROTO"
        );
        eprintln!(
            "note: no upstream csi.proto at ../shared/reference/csi.proto (nor \
             STOWAGE_REFERENCE_PROTO): proto/csi.proto is checked against the \
             committed proto/{FINGERPRINT_NAME} only"
        );
        return;
    };
    let upstream = fingerprint(
        &compile_path(&reference)
            .unwrap_or_else(|e| panic!("reference proto {}: {e}", reference.display())),
    );
    if write {
        std::fs::write(fingerprint_path(), render(&upstream))
            .unwrap_or_else(|e| panic!("write {}: {e}", fingerprint_path().display()));
        eprintln!(
            "wrote {} from {}",
            fingerprint_path().display(),
            reference.display()
        );
    }
    // What is written must read back as itself.
    assert_eq!(parse(&render(&upstream)).as_ref(), Ok(&upstream));
    if let Some(report) = describe_difference(&committed(), &upstream) {
        panic!(
            "proto/{FINGERPRINT_NAME} is not the fingerprint of {} \
             (- committed, + upstream); regenerate it with \
             scripts/proto-fingerprint.sh:\n{report}",
            reference.display()
        );
    }
}

#[test]
fn changed_field_number_is_detected() {
    let expected = committed();
    let original = project_text();
    let mutated = replace_in_message(
        &original,
        "GetPluginInfoResponse",
        "vendor_version = 2;",
        "vendor_version = 7;",
    );
    assert_ne!(mutated, original);
    let mutated = fingerprint(&compile_text(&mutated).unwrap_or_else(|e| panic!("mutated: {e}")));
    let report = describe_difference(&mutated, &expected)
        .expect("a changed field number must make the descriptors differ");
    assert!(
        report.contains("field .csi.v1.GetPluginInfoResponse.vendor_version differs"),
        "the report names the changed field:\n{report}"
    );
    assert!(
        report.contains("number: 7") && report.contains("number: 2"),
        "the report shows both field numbers:\n{report}"
    );
    // Only that field differs (and so does the encoding).
    assert_eq!(report.matches(" differs:").count(), 1, "{report}");
    assert!(report.contains("  encoding: "), "{report}");
}

#[test]
fn dropped_custom_option_is_detected() {
    // prost_types drops extension options; this proves they are compared.
    let expected = committed();
    let original = project_text();
    let mutated = replace_in_message(
        &original,
        "CreateVolumeRequest",
        " [(csi_secret) = true];",
        ";",
    );
    let mutated = fingerprint(&compile_text(&mutated).unwrap_or_else(|e| panic!("mutated: {e}")));
    let report = describe_difference(&mutated, &expected)
        .expect("a dropped (csi_secret) option must make the descriptors differ");
    assert!(
        report.contains("field .csi.v1.CreateVolumeRequest.secrets differs"),
        "{report}"
    );
    assert!(report.contains("csi_secret"), "{report}");
}

/// A fingerprint that disagrees with the project, in one section or only
/// in the hash line, fails the comparison: the committed file is really
/// what the project is held to.
#[test]
fn edited_fingerprint_is_detected() {
    let project = compile_project();
    let edited = edit_section(
        &project,
        "field .csi.v1.NodeStageVolumeRequest.staging_target_path",
        "number: 3",
        "number: 30",
    );
    let report = describe_difference(&project, &edited).expect("an edited section must differ");
    assert!(
        report.contains("field .csi.v1.NodeStageVolumeRequest.staging_target_path differs"),
        "{report}"
    );

    let mut rehashed = project.clone();
    rehashed.hash = "fnv1a64 0000000000000000, 1 bytes".to_owned();
    let report =
        describe_difference(&project, &rehashed).expect("a different hash alone must differ");
    assert!(
        report.contains("no section differs in text format"),
        "{report}"
    );

    let mut dropped = project.clone();
    let gone = dropped.sections.pop().expect("sections").0;
    let report = describe_difference(&project, &dropped).expect("an extra section must differ");
    assert!(
        report.contains(&format!("{gone}: not in CSI v1.12.0")),
        "{report}"
    );
    let report = describe_difference(&dropped, &project).expect("a missing section must differ");
    assert!(report.contains(&format!("{gone}: missing")), "{report}");
}

/// The file format round-trips, and a damaged file is an error rather than
/// a fingerprint that might compare equal to something.
#[test]
fn fingerprint_file_round_trips_and_damage_is_refused() {
    let project = compile_project();
    let text = render(&project);
    assert_eq!(parse(&text), Ok(project.clone()));

    let no_hash: String = text
        .lines()
        .filter(|l| !l.starts_with(HASH_KEY))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(parse(&no_hash).is_err());
    assert!(parse(&format!("{HASH_KEY}x\n")).is_err(), "no sections");
    assert!(
        parse(&format!("stray\n{text}")).is_err(),
        "text before the hash"
    );
    assert!(
        parse(&format!("{text}{SECTION_MARK}file header\nname: \"x\"\n")).is_err(),
        "a repeated section"
    );
    assert!(
        parse(&format!("{text}{SECTION_MARK}empty\n")).is_err(),
        "an empty section"
    );
    assert!(parse("").is_err());
}
