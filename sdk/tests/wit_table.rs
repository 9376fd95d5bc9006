//! The WIT (`sdk/wit`, the source of truth for Wasm components) and the native host-call table
//! (`spanvmm_sdk::hostif`) declare the same calls with the same parameter shapes.

use std::collections::BTreeSet;

use spanvmm_sdk::hostif::{host_calls, HostCall};
use wit_parser::{Resolve, Type, TypeDefKind};

/// The interfaces whose functions a native service reaches through `spanvmm_host`.
const IMPORTED: [&str; 4] = ["host", "snapshot", "migration", "agile"];

fn resolve() -> (Resolve, wit_parser::PackageId) {
    let mut r = Resolve::default();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/wit");
    let (pkg, _) = r.push_dir(dir).expect("parse sdk/wit");
    (r, pkg)
}

/// The C types a WIT scalar may travel as.
fn c_scalar(r: &Resolve, ty: &Type) -> Option<&'static str> {
    Some(match ty {
        Type::U16 => "uint16_t",
        Type::U32 => "uint32_t",
        Type::U64 => "uint64_t",
        Type::F64 => "double",
        Type::Bool => "uint32_t",
        Type::Id(id) => match &r.types[*id].kind {
            TypeDefKind::Enum(_) => "uint32_t",
            TypeDefKind::Type(t) => return c_scalar(r, t),
            _ => return None,
        },
        _ => return None,
    })
}

/// Checks WIT parameter `name: ty` against the C parameters of `call`; returns the C
/// parameters it accounts for.
fn match_param(r: &Resolve, call: &HostCall, name: &str, ty: &Type) -> Result<Vec<usize>, String> {
    let snake = name.replace('-', "_");
    let find = |n: &str| call.params.iter().position(|(p, _)| *p == n);
    let what = format!("{} parameter {name}", call.wit);
    // A scalar: the same name, the same C type (a length may be a size_t beside its buffer).
    if let Some(c) = c_scalar(r, ty) {
        let i = find(&snake).ok_or(format!("{what}: no C parameter {snake}"))?;
        let t = &call.params[i].1;
        let beside_buffer = i > 0 && call.params[i - 1].1.ends_with('*') && t == "size_t";
        if t != c && !beside_buffer {
            return Err(format!("{what}: C type {t}, expected {c}"));
        }
        return Ok(vec![i]);
    }
    // A string, an optional string or a list: a pointer and its length right after it.
    let is_seq = match ty {
        Type::String => true,
        Type::Id(id) => matches!(
            &r.types[*id].kind,
            TypeDefKind::List(_) | TypeDefKind::Option(Type::String)
        ),
        _ => false,
    };
    if is_seq {
        let i = find(&snake).ok_or(format!("{what}: no C pointer {snake}"))?;
        let ptr = &call.params[i].1;
        let len = call.params.get(i + 1);
        if !ptr.starts_with("const ") || !ptr.ends_with('*') {
            return Err(format!(
                "{what}: {snake} is {ptr}, expected a const pointer"
            ));
        }
        if len.map(|(_, t)| t.as_str()) != Some("size_t") {
            return Err(format!("{what}: {snake} lacks its size_t length"));
        }
        return Ok(vec![i, i + 1]);
    }
    // A record: a pointer to its C struct, or its fields one by one.
    if let Type::Id(id) = ty {
        if let TypeDefKind::Record(rec) = &r.types[*id].kind {
            if let Some(i) = find(&snake) {
                if call.params[i].1.starts_with("const ") && call.params[i].1.ends_with('*') {
                    return Ok(vec![i]);
                }
            }
            let mut used = Vec::new();
            for f in &rec.fields {
                used.extend(match_param(r, call, &f.name, &f.ty)?);
            }
            return Ok(used);
        }
    }
    Err(format!("{what}: no C shape for this WIT type"))
}

fn check(r: &Resolve, call: &HostCall, f: &wit_parser::Function) -> Result<(), String> {
    let mut used = BTreeSet::new();
    for p in &f.params {
        used.extend(match_param(r, call, &p.name, &p.ty)?);
    }
    let outputs: Vec<_> = call
        .params
        .iter()
        .enumerate()
        .filter(|(i, _)| !used.contains(i))
        .collect();
    // Whatever the WIT parameters do not account for is an output: a sink or an out pointer.
    for (_, (n, t)) in &outputs {
        let out = t == "const spanvmm_sink *" || (t.ends_with('*') && !t.starts_with("const "));
        if !out {
            return Err(format!(
                "{}: C parameter {n} ({t}) is in no WIT parameter",
                call.wit
            ));
        }
    }
    let fallible = matches!(f.result, Some(Type::Id(id))
        if matches!(r.types[id].kind, TypeDefKind::Result(_)));
    match (&f.result, fallible) {
        (None, _) => {
            if call.ret != "void" || !outputs.is_empty() {
                return Err(format!(
                    "{}: WIT returns nothing, C returns something",
                    call.wit
                ));
            }
        }
        (Some(_), true) => {
            if call.ret != "int32_t"
                || !outputs.iter().any(|(_, (n, _))| *n == "err" || *n == "out")
            {
                return Err(format!(
                    "{}: a WIT result needs int32_t and an err/out sink",
                    call.wit
                ));
            }
        }
        (Some(t), false) => match c_scalar(r, t) {
            Some(c) if call.ret == c => {}
            _ if !outputs.is_empty() => {}
            _ => return Err(format!("{}: C does not return the WIT result", call.wit)),
        },
    }
    Ok(())
}

#[test]
fn wit_and_the_native_table_declare_the_same_calls() {
    let (r, pkg) = resolve();
    let table = host_calls();
    let mut wit_calls = BTreeSet::new();
    let mut errors = Vec::new();
    for (iname, iid) in &r.packages[pkg].interfaces {
        if !IMPORTED.contains(&iname.as_str()) {
            continue;
        }
        for (fname, f) in &r.interfaces[*iid].functions {
            let key = format!("{iname}#{fname}");
            match table.iter().find(|c| c.wit == key) {
                Some(call) => {
                    if let Err(e) = check(&r, call, f) {
                        errors.push(e);
                    }
                }
                None => errors.push(format!("{key} is in the WIT but not in the table")),
            }
            wit_calls.insert(key);
        }
    }
    for c in &table {
        if !wit_calls.contains(c.wit) {
            errors.push(format!(
                "{} ({}) is in the table but not in the WIT",
                c.wit, c.field
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "WIT and sdk/src/hostif.rs disagree:\n{}",
        errors.join("\n")
    );
    assert_eq!(wit_calls.len(), table.len());
}
