//! `spanvmm plugin`: tools for service authors, no VM needed. `new` writes a service project
//! that builds with one command (Rust from the SDK's template, Python and JavaScript from the
//! example service, each with the WIT beside it); `inspect` reads a service file as `attach`
//! would and says what it is, or why it cannot be loaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use l1_services::{Inspection, RamHost, ServiceManager};

/// Languages `plugin new` writes a project for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with the SDK (`cargo build --release` gives the component).
    Rust,
    /// Python with componentize-py (`./build.sh`).
    Python,
    /// JavaScript with ComponentizeJS (`./build.sh`).
    Js,
}

/// The toolchains the Python and JavaScript projects pin (as plugins/examples/build.sh does).
const COMPONENTIZE_PY: &str = "0.25.1";
const COMPONENTIZE_JS: &str = "0.23.0";

/// The SDK's WIT, written into Python and JavaScript projects (their toolchains read it).
const WIT: [(&str, &str); 4] = [
    ("service.wit", include_str!("../../sdk/wit/service.wit")),
    ("migration.wit", include_str!("../../sdk/wit/migration.wit")),
    ("snapshot.wit", include_str!("../../sdk/wit/snapshot.wit")),
    ("agile.wit", include_str!("../../sdk/wit/agile.wit")),
];
const RUST_LIB: &str = include_str!("../../sdk/template/src/lib.rs");
const RUST_LOCK: &str = include_str!("../../sdk/template/Cargo.lock");
/// The repository's toolchain (it lists the wasm32-wasip2 target, so rustup installs it).
const RUST_TOOLCHAIN: &str = include_str!("../../rust-toolchain.toml");
const PY_APP: &str = include_str!("../../plugins/examples/port-counter/python/app.py");
const JS_APP: &str = include_str!("../../plugins/examples/port-counter/js/app.js");

/// Where this binary was built from: its SDK, if the source tree is still there.
fn built_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    sdk.join("Cargo.toml")
        .is_file()
        .then(|| sdk.canonicalize().ok())
        .flatten()
}

fn camel(name: &str) -> String {
    name.split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Writes a new service project `dir/name` in `lang`; `sdk` is the SDK for Rust (default:
/// the one this binary was built from). Returns the project's directory and how to build it.
pub fn new_project(
    name: &str,
    lang: Lang,
    dir: &Path,
    sdk: Option<&Path>,
) -> anyhow::Result<(PathBuf, String)> {
    let name_ok = l1_services::manifest::valid_name(name)
        && name.starts_with(|c: char| c.is_ascii_alphabetic());
    if !name_ok {
        bail!(
            "{name:?} is not a service name: 1-64 letters, digits, '-' or '_', starting with a \
             letter"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} exists already: choose another name or --dir",
            root.display()
        );
    }
    let mut files: Vec<(PathBuf, String, bool)> = Vec::new(); // (path, text, executable)
    let build = match lang {
        Lang::Rust => {
            let sdk = match sdk {
                Some(s) => s.to_path_buf(),
                None => built_sdk().context(
                    "the SDK this binary was built from is gone: give --sdk PATH (the \
                     spanvmm repository's sdk/ directory)",
                )?,
            };
            let sdk = std::path::absolute(&sdk).context("resolve --sdk")?;
            if !sdk.join("Cargo.toml").is_file() {
                bail!("--sdk {}: no Cargo.toml there", sdk.display());
            }
            let crate_name = name.replace('_', "-");
            files.push((
                "Cargo.toml".into(),
                format!(
                    "[package]\nname = \"{crate_name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                     publish = false\n\n[lib]\n# A Wasm component on wasm32-wasip2 (the default \
                     target, .cargo/config.toml),\n# a shared object with --target \
                     x86_64-unknown-linux-gnu.\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n\
                     spanvmm-sdk = {{ path = {sdk:?} }}\nserde = {{ version = \"1\", features = \
                     [\"derive\"] }}\n\n[profile.release]\nopt-level = 3\nlto = true\nstrip = \
                     \"debuginfo\"\n\n# Standalone: not part of another workspace.\n[workspace]\n",
                    sdk = sdk.display().to_string()
                ),
                false,
            ));
            files.push((
                ".cargo/config.toml".into(),
                "[build]\ntarget = \"wasm32-wasip2\"\n".into(),
                false,
            ));
            // The template's lock pins the versions the SDK was tested with.
            files.push((
                "Cargo.lock".into(),
                RUST_LOCK.replace(
                    "name = \"hello-service\"",
                    &format!("name = \"{crate_name}\""),
                ),
                false,
            ));
            files.push((
                "src/lib.rs".into(),
                RUST_LIB
                    .replace(
                        "Manifest::new(\"hello\"",
                        &format!("Manifest::new(\"{name}\""),
                    )
                    .replace("Hello", &camel(name))
                    .replace("//! hello:", &format!("//! {name}:")),
                false,
            ));
            files.push(("rust-toolchain.toml".into(), RUST_TOOLCHAIN.into(), false));
            files.push((".gitignore".into(), "/target\n".into(), false));
            format!(
                "cd {} && cargo build --release   # → target/wasm32-wasip2/release/{}.wasm",
                root.display(),
                crate_name.replace('-', "_")
            )
        }
        Lang::Python | Lang::Js => {
            for (f, text) in WIT {
                files.push((Path::new("wit").join(f), text.to_string(), false));
            }
            let (app, text, script) = match lang {
                Lang::Python => (
                    "app.py",
                    PY_APP,
                    format!(
                        "cpy=${{COMPONENTIZE_PY:-.venv/bin/componentize-py}}\n\
                         if [ ! -x \"$cpy\" ]; then\n    \
                         python3 -m venv .venv && .venv/bin/pip install -q componentize-py=={COMPONENTIZE_PY}\n\
                         fi\n\
                         \"$cpy\" -d wit -w service componentize -p . app -o {name}.wasm\n"
                    ),
                ),
                _ => (
                    "app.js",
                    JS_APP,
                    format!(
                        "cjs=${{COMPONENTIZE_JS:-node_modules/.bin/componentize-js}}\n\
                         if [ ! -x \"$cjs\" ]; then\n    \
                         npm install --no-audit --no-fund --loglevel=error --save-exact \
                         @bytecodealliance/componentize-js@{COMPONENTIZE_JS} >/dev/null\n\
                         fi\n\
                         # No HTTP: the host offers no wasi:http.\n\
                         \"$cjs\" app.js -w wit -n service -d http fetch-event -o {name}.wasm\n"
                    ),
                ),
            };
            files.push((
                app.into(),
                text.replace("port-counter", name).replace(
                    "the example service of plugins/examples",
                    "a spanvmm service",
                ),
                false,
            ));
            files.push((
                "build.sh".into(),
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm from {app} (the toolchain is installed \
                     here once; point\n# COMPONENTIZE_PY / COMPONENTIZE_JS at an installed one to \
                     skip that).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n{script}"
                ),
                true,
            ));
            files.push((
                ".gitignore".into(),
                format!(".venv/\nnode_modules/\n__pycache__/\n{name}.wasm\n"),
                false,
            ));
            format!("{}/build.sh   # → {name}.wasm", root.display())
        }
    };
    for (rel, text, exec) in files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        if exec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok((root, build))
}

/// Reads a service file as `attach` would, on a scratch 2 MiB guest (no VM runs).
pub fn inspect(file: &Path) -> anyhow::Result<Inspection> {
    let ram = Arc::new(base_vmm::memory::GuestRam::new(2 << 20)?);
    let host = Arc::new(RamHost::new(ram, 1, 1_000_000));
    let manager = ServiceManager::new(host, crate::services::cache_dir());
    let file = std::path::absolute(file).context("resolve the file")?;
    Ok(manager.inspect(&file))
}

/// `spanvmm plugin` commands.
#[derive(clap::Subcommand)]
pub enum PluginCmd {
    /// Write a new service project (NAME/ under --dir) that builds with one command.
    New {
        /// The service's name (also the project's directory and crate).
        name: String,
        /// Its language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
        /// Where to create the project.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The SDK (the repository's sdk/ directory) for Rust; default: the one this binary
        /// was built from.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Read a service file as `attach` would and print its manifest, capabilities, ABI
    /// version and imports as JSON; a file that cannot be loaded says why (exit status 1).
    Inspect {
        /// A `.wasm` component or a native `.so`.
        file: PathBuf,
    },
}

/// Runs a `spanvmm plugin` command; false when an inspected file cannot be loaded.
pub fn run(cmd: PluginCmd) -> anyhow::Result<bool> {
    match cmd {
        PluginCmd::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let (root, build) = new_project(&name, lang, &dir, sdk.as_deref())?;
            println!("created {}; build it with:\n  {build}", root.display());
            Ok(true)
        }
        PluginCmd::Inspect { file } => {
            let i = inspect(&file)?;
            println!("{}", serde_json::to_string_pretty(&i)?);
            if let Some(reason) = &i.reason {
                eprintln!("{} cannot be loaded: {reason}", file.display());
            }
            Ok(i.loadable)
        }
    }
}

#[cfg(test)]
mod tests {
    /// A new project gets every WIT file of the SDK (a missing one fails its build only).
    #[test]
    fn new_projects_get_every_wit_file() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wit"))
            .collect();
        on_disk.sort();
        let mut written: Vec<String> = super::WIT.iter().map(|(n, _)| n.to_string()).collect();
        written.sort();
        assert_eq!(written, on_disk);
    }
}
