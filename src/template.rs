//! Message templates for batch sends: the subject, text, HTML and header values of a
//! template are minijinja templates (`Hello {{ name }}`), compiled once per batch and
//! rendered once per recipient with that recipient's variables. HTML output is escaped;
//! every render runs on a fuel budget and an output cap, so a hostile template costs
//! bounded CPU and memory per recipient.

use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

/// Instructions one field's render may run: plenty for loops over a recipient's items,
/// nothing like an endless loop.
const FUEL: u64 = 100_000;
/// Largest rendered field; a template that grows past it fails for that recipient.
/// (minijinja itself refuses a string repetition past 100 MB before allocating it; one
/// below that is allocated, then refused here: renders of a batch run one at a time, so
/// a request can hold at most one such string.)
pub const MAX_OUTPUT: usize = 1024 * 1024;

/// A template that did not compile: answered `400` naming the field and the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: line {line}: {message}")]
pub struct CompileError {
    pub field: String,
    pub line: usize,
    pub message: String,
}

/// One recipient's render failed (an undefined variable, fuel or size exceeded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RenderError {
    pub field: String,
    pub message: String,
}

/// The template fields of a batch, before compiling.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    /// Header name and value template, in order.
    pub headers: Vec<(String, String)>,
    /// An undefined variable renders as the empty string instead of failing the recipient.
    pub lenient: bool,
}

/// One recipient's rendered fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Template names are the request's field names; `.html` turns escaping on.
const SUBJECT: &str = "subject";
const TEXT: &str = "text";
const HTML: &str = "html.html";

fn header_name(i: usize, name: &str) -> String {
    format!("headers.{name}#{i}")
}

pub struct Templates {
    env: Environment<'static>,
    spec: Spec,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("spec", &self.spec)
            .finish()
    }
}

impl Templates {
    pub fn compile(spec: Spec) -> Result<Templates, CompileError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(if spec.lenient {
            UndefinedBehavior::Lenient
        } else {
            UndefinedBehavior::Strict
        });
        env.set_fuel(Some(FUEL));
        env.set_auto_escape_callback(|name| {
            if name == HTML {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        let mut add = |name: String, field: &str, source: &str| {
            env.add_template_owned(name, source.to_owned())
                .map_err(|e| CompileError {
                    field: field.to_owned(),
                    line: e.line().unwrap_or(1),
                    message: e.detail().unwrap_or("syntax error").to_owned(),
                })
        };
        add(SUBJECT.into(), "subject", &spec.subject)?;
        if let Some(text) = &spec.text {
            add(TEXT.into(), "text", text)?;
        }
        if let Some(html) = &spec.html {
            add(HTML.into(), "html", html)?;
        }
        for (i, (name, value)) in spec.headers.iter().enumerate() {
            add(header_name(i, name), &format!("headers.{name}"), value)?;
        }
        Ok(Templates { env, spec })
    }

    /// Renders every field for one recipient's variables (a JSON object).
    ///
    /// CPU-bound and bounded by the fuel budget: run it off the async workers for large
    /// batches.
    pub fn render(&self, vars: &serde_json::Value) -> Result<Rendered, RenderError> {
        let ctx = Value::from(Serde(vars));
        let one = |name: &str, field: &str| -> Result<String, RenderError> {
            let fail = |message: String| RenderError {
                field: field.to_owned(),
                message,
            };
            let template = self
                .env
                .get_template(name)
                .map_err(|e| fail(e.to_string()))?;
            let out = template.render(ctx.clone()).map_err(|e| {
                fail(
                    e.detail()
                        .map_or_else(|| e.kind().to_string(), str::to_owned),
                )
            })?;
            if out.len() > MAX_OUTPUT {
                return Err(fail(format!("renders to more than {MAX_OUTPUT} bytes")));
            }
            Ok(out)
        };
        let subject = one(SUBJECT, "subject")?;
        let text = match self.spec.text {
            Some(_) => Some(one(TEXT, "text")?),
            None => None,
        };
        let html = match self.spec.html {
            Some(_) => Some(one(HTML, "html")?),
            None => None,
        };
        let mut headers = Vec::with_capacity(self.spec.headers.len());
        for (i, (name, _)) in self.spec.headers.iter().enumerate() {
            let value = one(&header_name(i, name), &format!("headers.{name}"))?;
            headers.push((name.clone(), value));
        }
        Ok(Rendered {
            subject,
            text,
            html,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(subject: &str) -> Spec {
        Spec {
            subject: subject.into(),
            text: Some("Hi {{ name }},\n{% for i in items %}- {{ i }}\n{% endfor %}".into()),
            html: Some("<p>Hi {{ name }}</p>".into()),
            headers: vec![("X-Order".into(), "{{ order }}".into())],
            lenient: false,
        }
    }

    #[test]
    fn renders_per_recipient_and_escapes_html_only() {
        let t = Templates::compile(spec("Hello {{ name }}")).unwrap();
        let r = t
            .render(&json!({"name": "<Bob>", "items": ["a", "b"], "order": 7}))
            .unwrap();
        assert_eq!(r.subject, "Hello <Bob>");
        assert_eq!(r.text.as_deref(), Some("Hi <Bob>,\n- a\n- b\n"));
        assert_eq!(r.html.as_deref(), Some("<p>Hi &lt;Bob&gt;</p>"));
        assert_eq!(r.headers, vec![("X-Order".to_owned(), "7".to_owned())]);
    }

    #[test]
    fn compile_errors_name_the_field_and_line() {
        let mut s = spec("ok");
        s.text = Some("line one\nline two {{ broken\n".into());
        let e = Templates::compile(s).unwrap_err();
        assert_eq!(e.field, "text");
        assert_eq!(e.line, 2, "{e}");
        let mut s = spec("ok");
        s.headers = vec![("X-A".into(), "{% if %}".into())];
        assert_eq!(Templates::compile(s).unwrap_err().field, "headers.X-A");
    }

    #[test]
    fn undefined_variables_fail_the_recipient_not_the_batch() {
        let t = Templates::compile(spec("Hello {{ name }}")).unwrap();
        let e = t.render(&json!({"items": [], "order": 1})).unwrap_err();
        assert_eq!(e.field, "subject");
        assert!(
            t.render(&json!({"name": "x", "items": [], "order": 1}))
                .is_ok()
        );
    }

    #[test]
    fn lenient_renders_undefined_as_empty() {
        let mut s = spec("Hello {{ name }}!");
        s.lenient = true;
        let t = Templates::compile(s).unwrap();
        let r = t.render(&json!({"items": [], "order": 1})).unwrap();
        assert_eq!(r.subject, "Hello !");
    }

    #[test]
    fn hostile_templates_are_bounded() {
        let endless = Spec {
            subject: "{% for i in range(100000000) %}x{% endfor %}".into(),
            ..Spec::default()
        };
        let t = Templates::compile(endless).unwrap();
        assert!(t.render(&json!({})).is_err(), "fuel did not stop the loop");
        let huge = Spec {
            subject: "{{ 'ab' * 100000000 }}".into(),
            ..Spec::default()
        };
        let t = Templates::compile(huge).unwrap();
        assert!(
            t.render(&json!({})).is_err(),
            "a 200 MB subject was rendered"
        );
    }
}
