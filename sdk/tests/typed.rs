//! The `#[service]` attribute without a host: what `call`, `attach`, `detach` and
//! `resume_from` it generates (the host's side is in l1-services/tests/services.rs).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spanvmm_sdk::call::Num;
use spanvmm_sdk::{Manifest, Service};

#[derive(Default, Serialize, Deserialize)]
struct Calc {
    total: u64,
    #[serde(skip)]
    scale: u64,
}

#[derive(Deserialize)]
struct Config {
    scale: Num<u64>,
}

#[spanvmm_sdk::service(state, no_export)]
impl Service for Calc {
    fn manifest() -> Manifest {
        Manifest::new("calc", "0.1.0")
    }

    fn attach(&mut self, cfg: Config) -> Result<(), String> {
        self.scale = cfg.scale.0;
        Ok(())
    }

    #[method]
    fn total(&self) -> u64 {
        self.total
    }

    #[method(name = "add-scaled")]
    fn add(&mut self, a: u64, b: Option<u64>) -> Result<u64, String> {
        let n = (a + b.unwrap_or(0))
            .checked_mul(self.scale)
            .ok_or("overflow")?;
        self.total += n;
        Ok(self.total)
    }

    #[method]
    fn echo(&self, v: Value) -> Value {
        v
    }
}

fn err(c: &mut Calc, m: &str, a: &str) -> Value {
    let e = c.call(m, a).unwrap_err();
    serde_json::from_str(&e).unwrap_or_else(|_| json!(e))
}

#[test]
fn typed_config() {
    let mut c = Calc::default();
    c.attach(r#"{"scale": "0x2"}"#).unwrap();
    assert_eq!(c.scale, 2);
    let e = Calc::default().attach("").unwrap_err();
    assert!(e.contains("none given") && e.contains("scale"), "{e}");
    let e = Calc::default().attach(r#"{"scale": -1}"#).unwrap_err();
    assert!(e.contains("negative"), "{e}");
}

#[test]
fn typed_dispatch() {
    let mut c = Calc::default();
    c.attach(r#"{"scale": 2}"#).unwrap();
    assert_eq!(c.call("add-scaled", r#"{"a": 1, "b": 2}"#).unwrap(), "6");
    assert_eq!(c.call("add-scaled", "[1]").unwrap(), "8");
    assert_eq!(c.call("add-scaled", r#"{"a": 1}"#).unwrap(), "10");
    assert_eq!(c.call("total", "").unwrap(), "10");
    // One parameter of an object type takes the arguments whole.
    assert_eq!(c.call("echo", r#"{"x": 1}"#).unwrap(), r#"{"x":1}"#);
    let e = err(&mut c, "add-scaled", r#"{"b": 1}"#);
    assert_eq!(e["error"], "bad-args");
    assert_eq!(e["message"], "argument `a` is missing");
    assert_eq!(e["usage"], "add-scaled(a: u64, b: Option<u64>)");
    let e = err(&mut c, "add-scaled", r#"{"a": 1, "c": 2}"#);
    assert_eq!(e["message"], "unknown argument `c`");
    let e = err(&mut c, "add-scaled", "[1, 2, 3]");
    assert!(
        e["message"].as_str().unwrap().contains("3 arguments"),
        "{e}"
    );
    // A single value is the first argument.
    assert_eq!(c.call("add-scaled", "1").unwrap(), "12");
    let e = err(&mut c, "add-scaled", r#"{"a": "x"}"#);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("argument `a`: invalid type"),
        "{e}"
    );
    let e = err(&mut c, "total", "1");
    assert_eq!(e["message"], "this method takes no arguments");
    let e = err(&mut c, "add", "");
    assert_eq!(e["error"], "unknown-method");
    assert_eq!(e["methods"], json!(["total", "add-scaled", "echo"]));
    assert_eq!(c.call("total", "null").unwrap(), "12");
    // The method's own error is its text.
    assert_eq!(
        err(&mut c, "add-scaled", &format!("[{}]", u64::MAX)),
        json!("overflow")
    );
}

#[test]
fn serde_state_hand_over() {
    let mut old = Calc::default();
    old.attach(r#"{"scale": 1}"#).unwrap();
    old.call("add-scaled", "[5]").unwrap();
    let state = old.detach();
    assert_eq!(
        serde_json::from_slice::<Value>(&state).unwrap(),
        json!({"total": 5})
    );
    let mut new = Calc::default();
    new.attach(r#"{"scale": 3}"#).unwrap();
    new.resume_from(&state).unwrap();
    assert_eq!(new.total, 5);
    // A fresh start (no state) keeps the attached value; a foreign state is refused clearly.
    new.resume_from(&[]).unwrap();
    let e = new.resume_from(br#"{"total": "many"}"#).unwrap_err();
    assert!(e.starts_with("predecessor's state"), "{e}");
}
