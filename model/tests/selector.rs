#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::BTreeMap;

use switchyard_model::Selector;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

#[test]
fn kubectl_operators_match_like_kubectl() {
    let web = labels(&[("tier", "frontend"), ("env", "prod")]);
    let api = labels(&[
        ("tier", "backend"),
        ("env", "prod"),
        ("app.kubernetes.io/name", "api"),
    ]);
    let bare = labels(&[]);
    let cases: &[(&str, [bool; 3])] = &[
        ("", [true, true, true]),
        ("env=prod", [true, true, false]),
        ("env==prod", [true, true, false]),
        ("env!=prod", [false, false, true]),
        ("tier in (frontend, backend)", [true, true, false]),
        ("tier notin (frontend)", [false, true, true]),
        ("tier notin (frontend),env=prod", [false, true, false]),
        ("app.kubernetes.io/name", [false, true, false]),
        ("!app.kubernetes.io/name", [true, false, true]),
        ("env=prod, !tier", [false, false, false]),
        ("  tier  =  frontend  ", [true, false, false]),
    ];
    for (sel, want) in cases {
        let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
        let got = [s.matches(&web), s.matches(&api), s.matches(&bare)];
        assert_eq!(&got, want, "selector {sel:?}");
    }
}

#[test]
fn bad_selectors_get_kubectl_like_errors() {
    let cases = [
        ("tier in frontend", "expected: '('"),
        ("tier in ()", "values set can't be empty"),
        ("tier notin (a,", "expected: ',', ')' or identifier"),
        ("=x", "expected: !, identifier, or 'end of string'"),
        ("tier=a=b", "expected: ',' or 'end of string'"),
        (
            "-bad=x",
            "name part must consist of alphanumeric characters",
        ),
        (
            "Bad_Prefix.io/x=y",
            "prefix part a lowercase RFC 1123 subdomain",
        ),
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=x",
            "no more than 63 characters",
        ),
        ("k=bad value", "expected: ',' or 'end of string'"),
        ("k=bad$", "invalid label value"),
        ("k>abc", "must be an integer"),
        ("a,", "identifier after ','"),
    ];
    for (sel, want) in cases {
        let err = Selector::parse(sel).unwrap_err().to_string();
        assert!(
            err.contains(want),
            "{sel:?}: {err:?} should contain {want:?}"
        );
    }
}
