//! The API contract, checked against the document the service serves: requests are generated
//! at and around every bound `/openapi.json` states (and past them), each is judged valid or
//! not by the document's own schemas (`jsonschema`), and then:
//! - a request the document allows is accepted (never a 400 or a 422);
//! - every answer, allowed or not, is one the document lists for that operation, with a body
//!   that matches the schema it gives, and names the replica in `X-Served-By`.
//!
//! The document is the oracle: the test keeps no copy of the limits, so a handler that refuses
//! what the document allows, or answers what it does not list, fails here.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use quote_service::{AppState, app};
use quote_store::{Database, Options, Storage};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The served document, and a runtime to drive the router from proptest's synchronous cases.
struct Contract {
    doc: Value,
    app: Router,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// One answer.
struct Answer {
    status: u16,
    served_by: bool,
    body: Vec<u8>,
}

impl Contract {
    fn new() -> Contract {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = Database::open(&dir.path().join("quotes.db"), Options::default()).unwrap();
        let state = AppState::new("replica-contract", None);
        state.attach_storage(Storage::sqlite(db, 2));
        let app = app(state);
        let mut contract = Contract {
            doc: Value::Null,
            app,
            runtime,
            _dir: dir,
        };
        let answer = contract.send(Method::GET, "/openapi.json", None);
        assert_eq!(answer.status, 200);
        contract.doc = serde_json::from_slice(&answer.body).expect("the document is JSON");
        contract
    }

    fn send(&self, method: Method, uri: &str, body: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        self.runtime.block_on(async {
            let response = self.app.clone().oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let served_by = response.headers().contains_key("x-served-by");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            Answer {
                status,
                served_by,
                body: body.to_vec(),
            }
        })
    }

    fn operation(&self, path: &str, method: &str) -> &Value {
        let op = &self.doc["paths"][path][method];
        assert!(op.is_object(), "the document has no {method} {path}");
        op
    }

    /// A validator for `schema`, whose `$ref`s point into the document's components.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let rooted = json!({
            "components": self.doc["components"].clone(),
            "allOf": [schema],
        });
        jsonschema::validator_for(&rooted).expect("a valid schema in the document")
    }

    /// The schema of `name` (a path or query parameter) of an operation.
    fn parameter(&self, path: &str, method: &str, name: &str) -> jsonschema::Validator {
        let op = self.operation(path, method);
        let param = op["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("{method} {path} documents no parameter {name}"));
        self.validator(&param["schema"])
    }

    fn request_body(&self, path: &str, method: &str) -> jsonschema::Validator {
        let schema =
            &self.operation(path, method)["requestBody"]["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{method} {path} documents no JSON body");
        self.validator(schema)
    }

    /// Checks that `answer` is one the document lists for the operation, body included.
    fn check(&self, path: &str, method: &str, request: &str, answer: &Answer) {
        let response = &self.operation(path, method)["responses"][answer.status.to_string()];
        assert!(
            response.is_object(),
            "{request}: answered {} ({}), which the document does not list for {method} {path}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        assert!(answer.served_by, "{request}: no X-Served-By");
        let schema = &response["content"]["application/json"]["schema"];
        if schema.is_object() {
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
                panic!(
                    "{request}: {} with a body that is not JSON: {e}",
                    answer.status
                )
            });
            let validator = self.validator(schema);
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{request}: the {} body {body} does not match the document: {errors:?}",
                answer.status
            );
        }
    }
}

/// The value a parameter written as `raw` in a URL stands for, as its schema judges it: an
/// integer when `raw` is one written the way a client following the document writes an
/// integer (decimal digits, a minus sign, no leading zero), else the string itself (which no
/// integer schema allows: `1e3`, `+1` or `01` are not how the document asks for 1000 or 1).
fn as_json(raw: &str) -> Value {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    match serde_json::from_str::<serde_json::Number>(raw) {
        Ok(n) if canonical => Value::Number(n),
        _ => Value::String(raw.to_owned()),
    }
}

/// An integer parameter as a client could write it: at the edges of every integer type, near
/// small bounds, anywhere, or not an integer at all.
fn integer_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            i64::MIN,
            -9_223_372_036_854_775_807,
            -1,
            0,
            1,
            2,
            99,
            100,
            101,
            i64::from(u32::MAX),
            i64::MAX,
        ])
        .prop_map(|n| n.to_string()),
        (-5i64..300).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_owned()),
        prop::sample::select(vec!["x", "1.5", "1e3", "+1", "01", "-0", "0x10", "%20"])
            .prop_map(str::to_owned),
    ]
}

/// Text for a quote's field: lengths at and around both bounds of either field (the document
/// gives them; these only aim near them), of letters, spaces, other scripts, and the control
/// characters a field may or may not hold.
fn field_text() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        8 => prop::char::range('a', 'z'),
        2 => Just(' '),
        1 => prop::sample::select(vec![
            '\n', '\t', '\r', '\u{0}', '\u{1f}', '\u{7f}', '\u{85}', '\u{a0}', 'é', '€', '𝄞',
            '\u{2028}', '\u{feff}',
        ]),
    ];
    let len = prop_oneof![0usize..=3, 198usize..=202, 997usize..=1002, 0usize..=1002];
    len.prop_flat_map(move |n| prop::collection::vec(chars.clone(), n))
        .prop_map(|cs| cs.into_iter().collect())
}

/// A request body for `POST /quotes`: well-formed, or missing, adding or mistyping a field.
fn create_body() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (field_text(), field_text()).prop_map(|(t, a)| json!({"text": t, "author": a})),
        1 => field_text().prop_map(|t| json!({"text": t})),
        1 => (field_text(), field_text()).prop_map(|(t, a)| json!({"text": t, "author": a, "by": 1})),
        1 => field_text().prop_map(|t| json!({"text": t, "author": 7})),
        1 => Just(json!([])),
    ]
}

/// A request the document allows must not be refused as bad input (400 or 422).
fn not_refused(request: &str, allowed: bool, answer: &Answer) -> Result<(), TestCaseError> {
    prop_assert!(
        !(allowed && (answer.status == 400 || answer.status == 422)),
        "{request}: the document allows it, the service refused it with {}: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn quote_ids_the_document_allows_are_accepted_and_every_answer_is_documented(
        id in integer_text(),
    ) {
        let contract = contracted();
        let uri = format!("/quotes/{id}");
        for (method, m) in [(Method::GET, "get"), (Method::DELETE, "delete")] {
            let allowed = contract.parameter("/quotes/{id}", m, "id").is_valid(&as_json(&id));
            let answer = contract.send(method, &uri, None);
            let request = format!("{m} {uri}");
            contract.check("/quotes/{id}", m, &request, &answer);
            not_refused(&request, allowed, &answer)?;
        }
    }

    #[test]
    fn list_parameters_the_document_allows_are_accepted_and_every_answer_is_documented(
        limit in prop::option::of(integer_text()),
        after in prop::option::of(integer_text()),
    ) {
        let contract = contracted();
        let mut query = Vec::new();
        let mut allowed = true;
        for (name, value) in [("limit", &limit), ("after", &after)] {
            if let Some(value) = value {
                query.push(format!("{name}={value}"));
                allowed &= contract.parameter("/quotes", "get", name).is_valid(&as_json(value));
            }
        }
        let uri = format!("/quotes?{}", query.join("&"));
        let answer = contract.send(Method::GET, &uri, None);
        let request = format!("get {uri}");
        contract.check("/quotes", "get", &request, &answer);
        not_refused(&request, allowed, &answer)?;
    }

    #[test]
    fn quotes_the_document_allows_are_stored_and_every_answer_is_documented(
        body in create_body(),
    ) {
        let contract = contracted();
        let allowed = contract.request_body("/quotes", "post").is_valid(&body);
        let text = body.to_string();
        let answer = contract.send(Method::POST, "/quotes", Some(&text));
        let request = format!("post /quotes {}", truncate(&text));
        contract.check("/quotes", "post", &request, &answer);
        prop_assert!(
            !allowed || answer.status == 201,
            "{request}: the document allows it, the service answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
}

/// One service and its document for all the cases of a test thread.
fn contracted() -> &'static Contract {
    thread_local! {
        static CONTRACT: &'static Contract = Box::leak(Box::new(Contract::new()));
    }
    CONTRACT.with(|c| *c)
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= 80 {
        return text.to_owned();
    }
    let head: String = text.chars().take(80).collect();
    format!("{head}… ({} characters)", text.chars().count())
}

#[test]
fn the_examples_the_document_used_to_allow_are_now_outside_it() {
    let contract = Contract::new();
    let id = contract.parameter("/quotes/{id}", "get", "id");
    assert!(!id.is_valid(&json!(-9_223_372_036_854_775_807i64)));
    assert!(!id.is_valid(&json!(0)));
    assert!(id.is_valid(&json!(1)));
    let after = contract.parameter("/quotes", "get", "after");
    assert!(
        !after.is_valid(&as_json("18446744073709551616")),
        "{}",
        contract.doc["paths"]["/quotes"]["get"]["parameters"]
    );
    assert!(!after.is_valid(&as_json("-1")));
    assert!(after.is_valid(&as_json("0")));
    assert!(!id.is_valid(&as_json("1e3")));
    let limit = contract.parameter("/quotes", "get", "limit");
    assert!(!limit.is_valid(&json!(0)));
    assert!(!limit.is_valid(&json!(101)));
    assert!(limit.is_valid(&json!(100)));
    let body = contract.request_body("/quotes", "post");
    assert!(!body.is_valid(&json!({"text": "", "author": "a"})));
    assert!(!body.is_valid(&json!({"text": "   ", "author": "a"})));
    assert!(!body.is_valid(&json!({"text": "a\u{7}b", "author": "a"})));
    assert!(body.is_valid(&json!({"text": "a\nb\tc", "author": "a"})));
    // And the service agrees on both sides of the line.
    for (quote, status) in [
        (json!({"text": "a\nb\tc", "author": "a"}), 201),
        (json!({"text": "   ", "author": "a"}), 422),
    ] {
        let text = quote.to_string();
        let answer = contract.send(Method::POST, "/quotes", Some(&text));
        assert_eq!(answer.status, status, "{text}");
        contract.check("/quotes", "post", &text, &answer);
    }
}
