//! What the [`service`](crate::service) attribute expands to: a typed attach config, typed call
//! arguments and JSON results, and the JSON state hand-over. The functions work by hand too.
//!
//! Errors about a call itself (an unknown method, arguments that do not fit) are JSON objects,
//! so a client can tell them from the method's own error text:
//!
//! ```text
//! {"error":"unknown-method","method":"stat","methods":["stats","reset"]}
//! {"error":"bad-args","method":"port","message":"argument `port`: invalid type: string \"x\", expected u16","usage":"port(port: u16)"}
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Parses an attach config (JSON) into `T`. An empty config reads as `null` (so `Option<T>` and
/// `()` accept it) and then as `{}` (so does a struct whose fields all have defaults).
pub fn config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    let text = config.trim();
    if text.is_empty() {
        return serde_json::from_value(Value::Null)
            .or_else(|_| serde_json::from_value(Value::Object(Map::new())))
            .map_err(|e| format!("config: none given, and this service needs one: {e}"));
    }
    serde_json::from_str(text).map_err(|e| format!("config {text:?}: {e}"))
}

/// The JSON error of a call that does not fit the method.
fn bad_args(method: &str, usage: &str, message: String) -> String {
    json!({ "error": "bad-args", "method": method, "message": message, "usage": usage }).to_string()
}

/// The JSON error of a call to a method the service does not have.
pub fn unknown_method(method: &str, methods: &[&str]) -> String {
    json!({ "error": "unknown-method", "method": method, "methods": methods }).to_string()
}

/// A call's arguments, decoded for a method with parameters `names`: with one parameter, the
/// arguments are its value (or `{"name": value}`); with more, an object by name, an array by
/// position, or a single value for the first. A missing argument reads as `null`, which an
/// `Option` parameter accepts.
pub struct Args<'a> {
    method: &'a str,
    usage: &'a str,
    names: &'a [&'a str],
    value: Value,
}

impl<'a> Args<'a> {
    /// Parses `raw` (empty means no arguments) for `method`, whose signature is `usage`.
    pub fn parse(
        method: &'a str,
        usage: &'a str,
        names: &'a [&'a str],
        raw: &str,
    ) -> Result<Self, String> {
        let text = raw.trim();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text)
                .map_err(|e| bad_args(method, usage, format!("the arguments are not JSON: {e}")))?
        };
        let args = Args {
            method,
            usage,
            names,
            value,
        };
        args.check_shape()?;
        Ok(args)
    }

    fn bad(&self, message: String) -> String {
        bad_args(self.method, self.usage, message)
    }

    fn check_shape(&self) -> Result<(), String> {
        let n = self.names.len();
        match &self.value {
            Value::Null => Ok(()),
            _ if n == 1 => Ok(()),
            Value::Object(m) if n == 0 && m.is_empty() => Ok(()),
            Value::Array(a) if n == 0 && a.is_empty() => Ok(()),
            _ if n == 0 => Err(self.bad("this method takes no arguments".into())),
            Value::Object(m) => match m.keys().find(|k| !self.names.contains(&k.as_str())) {
                Some(k) => Err(self.bad(format!("unknown argument `{k}`"))),
                None => Ok(()),
            },
            Value::Array(a) if a.len() > n => Err(self.bad(format!(
                "{} arguments given; this method takes {n}",
                a.len()
            ))),
            // One value for several parameters: the first (`regs 0` from the command line).
            _ => Ok(()),
        }
    }

    /// Argument `index`, named `name`, as a `T`.
    pub fn get<T: DeserializeOwned>(&self, index: usize, name: &str) -> Result<T, String> {
        let v = if self.names.len() == 1 {
            match serde_json::from_value::<T>(self.value.clone()) {
                Ok(t) => return Ok(t),
                Err(e) => match &self.value {
                    Value::Object(m) if m.len() == 1 && m.contains_key(name) => m[name].clone(),
                    Value::Null => Value::Null,
                    _ => return Err(self.bad(format!("argument `{name}`: {e}"))),
                },
            }
        } else {
            match &self.value {
                Value::Object(m) => m.get(name).cloned().unwrap_or(Value::Null),
                Value::Array(a) => a.get(index).cloned().unwrap_or(Value::Null),
                v if index == 0 => v.clone(),
                _ => Value::Null,
            }
        };
        let missing = v.is_null();
        serde_json::from_value(v).map_err(|e| {
            self.bad(if missing {
                format!("argument `{name}` is missing")
            } else {
                format!("argument `{name}`: {e}")
            })
        })
    }
}

/// A method's value as the call's JSON result.
pub fn answer<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| format!("the result is not JSON: {e}"))
}

/// A method's `Result`: the value as JSON, or the error's text.
pub fn answer_result<T: Serialize, E: std::fmt::Display>(
    r: Result<T, E>,
) -> Result<String, String> {
    r.map_err(|e| e.to_string()).and_then(|v| answer(&v))
}

/// The service's whole value as its state (JSON), for a successor's [`load_state`].
pub fn save_state<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|e| {
        crate::host::log(
            crate::LogLevel::Error,
            &format!("the state is not serializable, handing over none: {e}"),
        );
        Vec::new()
    })
}

/// Takes over a predecessor's [`save_state`]: the value becomes the predecessor's (fields it
/// lacks take their `#[serde(default)]`). No state (a fresh start) keeps the value as attached.
pub fn load_state<T: DeserializeOwned>(value: &mut T, state: &[u8]) -> Result<(), String> {
    if state.is_empty() {
        return Ok(());
    }
    *value = serde_json::from_slice(state).map_err(|e| format!("predecessor's state: {e}"))?;
    Ok(())
}

/// A number in a config or in call arguments, given as a JSON number or as a decimal or `0x`
/// hex string (`1792`, `"1792"`, `"0x700"`), and checked to fit `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Num<T>(pub T);

impl<T: Serialize> Serialize for Num<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: TryFrom<u64>> serde::Deserialize<'de> for Num<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, or a decimal or 0x hex string")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
                let r = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => v.parse(),
                };
                r.map_err(|_| E::custom(format!("{v:?} is not a decimal or 0x hex number")))
            }
        }
        let n = d.deserialize_any(V)?;
        T::try_from(n).map(Num).map_err(|_| {
            serde::de::Error::custom(format!(
                "{n} is too large for {}",
                std::any::type_name::<T>()
            ))
        })
    }
}
