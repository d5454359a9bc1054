//! Real esbuild from the pinned toolchain, on the kinds of input agents send.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use tollgate_bundler::{BundleError, Bundler, BundlerConfig, Limits};
use tollgate_runtime::Toolchain;

fn bundler_with(limits: Limits) -> (Bundler, tempfile::TempDir) {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let b = Bundler::new(BundlerConfig {
        esbuild: t.esbuild,
        node_modules: t.node_modules,
        packages: t.packages,
        work_dir: work.path().to_owned(),
        limits,
    })
    .unwrap();
    (b, work)
}

fn bundler() -> (Bundler, tempfile::TempDir) {
    bundler_with(Limits::default())
}

pub const HONO_APP: [(&str, &str); 3] = [
    (
        "src/index.tsx",
        r#"import { Hono } from 'hono'
import { greet } from './greet'
import info from './info.json'
type Env = { Bindings: { NAME: string } }
const app = new Hono<Env>()
app.get('/', (c) => c.text(greet(c.env.NAME ?? 'world')))
app.get('/info', (c) => c.json(info))
app.get('/page', (c) => c.html(<h1 class="t">Hi {c.env.NAME}</h1>))
export default app
"#,
    ),
    (
        "src/greet.ts",
        "export function greet(name: string): string { return `hello ${name}` }\n",
    ),
    ("src/info.json", "{\"service\": \"demo\"}\n"),
];

async fn expect_err(b: &Bundler, files: Vec<(&str, Vec<u8>)>) -> BundleError {
    b.bundle_raw(files).await.unwrap_err()
}

#[tokio::test]
async fn hono_tsx_app_with_three_files_becomes_one_module() {
    let (b, work) = bundler();
    let bundle = b.bundle_raw(HONO_APP).await.unwrap();
    let m = &bundle.manifest;
    assert_eq!(m.entry, "src/index.tsx");
    assert_eq!(
        m.inputs,
        vec!["src/greet.ts", "src/index.tsx", "src/info.json"]
    );
    assert_eq!(m.packages.keys().collect::<Vec<_>>(), vec!["hono"]);
    assert_eq!(m.jsx_import_source.as_deref(), Some("hono/jsx"));
    assert_eq!(m.size_bytes, bundle.code.len() as u64);
    assert!(
        bundle.code.contains("export {"),
        "an ES module with a default export"
    );
    assert!(bundle.code.contains("hello "));
    // The build dir is gone; only the node_modules link stays.
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["node_modules"]);
}

#[tokio::test]
async fn package_json_main_wins_over_conventional_entries() {
    let (b, _w) = bundler();
    let bundle = b
        .bundle_raw([
            ("package.json", r#"{"main": "./app/main.js"}"#),
            (
                "app/main.js",
                "export default { fetch() { return new Response('main') } }",
            ),
            (
                "src/index.ts",
                "export default { fetch() { return new Response('index') } }",
            ),
        ])
        .await
        .unwrap();
    assert_eq!(bundle.manifest.entry, "app/main.js");
    assert!(bundle.code.contains("'main'") || bundle.code.contains("\"main\""));
}

#[tokio::test]
async fn syntax_error_comes_back_as_file_line_col() {
    let (b, work) = bundler();
    let e = b
        .bundle_raw([
            (
                "src/index.ts",
                "import { x } from './lib'\nexport default x\n",
            ),
            ("src/lib.ts", "export const x = 1\nlet y z = 2\n"),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.code(), "BUNDLE_FAILED");
    assert_eq!(e.diagnostics.len(), 1);
    assert!(
        e.message
            .starts_with("src/lib.ts:2:6 Expected \";\" but found \"z\""),
        "{}",
        e.message
    );
    assert!(
        std::fs::read_dir(work.path()).unwrap().count() == 1,
        "build dir removed on failure"
    );
}

#[tokio::test]
async fn imports_outside_the_curated_set_name_the_package_and_list_the_set() {
    let (b, _w) = bundler();
    // Not installed at all.
    let e = b
        .bundle_raw([(
            "src/index.ts",
            "import _ from 'lodash'\nexport default { fetch() { return new Response(String(_)) } }",
        )])
        .await
        .unwrap_err();
    assert_eq!(e.code(), "BUNDLE_FAILED");
    assert!(
        e.message
            .contains("src/index.ts:1:14 Could not resolve \"lodash\""),
        "{}",
        e.message
    );
    assert!(e.hint.contains("\"lodash\" is not available"), "{}", e.hint);
    assert!(e.hint.contains("hono@"), "{}", e.hint);
    // Installed on the host (it is a tool), but not offered to tenants.
    let e = b
        .bundle_raw([("src/index.ts", "import * as eb from 'esbuild'\nexport default { fetch() { return new Response(String(eb.version)) } }")])
        .await
        .unwrap_err();
    assert!(
        e.message
            .contains("imports package \"esbuild\", which is not in the platform's package set"),
        "{}",
        e.message
    );
    assert!(e.hint.contains("zod@"), "{}", e.hint);
}

#[tokio::test]
async fn missing_entry_lists_what_was_looked_for() {
    let (b, _w) = bundler();
    let e = b
        .bundle_raw([("lib/util.ts", "export const a = 1")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), "VALIDATION_ERROR");
    assert!(
        e.message
            .contains("package.json `main`, then src/index.ts, src/index.tsx"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn refused_inputs_do_no_work() {
    let (b, work) = bundler_with(Limits {
        max_files: 3,
        max_source_bytes: 1000,
        ..Limits::default()
    });
    let ok = b"export default {}".to_vec();
    type Case<'a> = (Vec<(&'a str, Vec<u8>)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], "VALIDATION_ERROR", "no files"),
        (
            vec![("/abs.ts", ok.clone())],
            "VALIDATION_ERROR",
            "absolute path",
        ),
        (
            vec![("src/../../x.ts", ok.clone())],
            "VALIDATION_ERROR",
            "`..`",
        ),
        (vec![("a\0.ts", ok.clone())], "VALIDATION_ERROR", "NUL"),
        (
            vec![("src\\a.ts", ok.clone())],
            "VALIDATION_ERROR",
            "backslash",
        ),
        (
            vec![(".env.production", ok.clone())],
            "VALIDATION_ERROR",
            ".env",
        ),
        (
            vec![("node_modules/x/index.js", ok.clone())],
            "VALIDATION_ERROR",
            "node_modules",
        ),
        (vec![(".git/HEAD", ok.clone())], "VALIDATION_ERROR", ".git"),
        (
            vec![("index.ts", vec![0x66, 0xff, 0x00])],
            "VALIDATION_ERROR",
            "not UTF-8",
        ),
        (
            vec![("./index.ts", ok.clone()), ("index.ts", ok.clone())],
            "VALIDATION_ERROR",
            "duplicate path",
        ),
        (
            vec![
                ("a.ts", ok.clone()),
                ("b.ts", ok.clone()),
                ("c.ts", ok.clone()),
                ("index.ts", ok.clone()),
            ],
            "SIZE_LIMIT",
            "more than 3 files",
        ),
        (
            vec![("index.ts", vec![b' '; 1001])],
            "SIZE_LIMIT",
            "more than 1000 bytes",
        ),
    ];
    for (files, code, needle) in cases {
        let e = expect_err(&b, files).await;
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message.contains(needle),
            "{needle:?} not in {:?}",
            e.message
        );
        assert!(!e.hint.is_empty());
    }
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "no build dir was made"
    );
}

#[tokio::test]
async fn oversized_bundle_is_refused() {
    let (b, _w) = bundler_with(Limits {
        max_bundle_bytes: 2_000,
        ..Limits::default()
    });
    let big = format!(
        "export default {{ fetch() {{ return new Response({:?}) }} }}",
        "x".repeat(5_000)
    );
    let e = b
        .bundle_raw(BTreeMap::from([("index.js", big)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "SIZE_LIMIT");
    assert!(
        e.message.contains("more than the 2000 allowed"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn imports_cannot_reach_host_files() {
    let (b, work) = bundler();
    // A file beside the build dirs that a tenant must never read.
    std::fs::write(
        work.path().join("secret.js"),
        "export default 'host secret'",
    )
    .unwrap();
    let secret = work.path().join("secret.js");
    for (entry, needle) in [
        (
            format!(
                "import s from {:?}\nexport default s",
                secret.display().to_string()
            ),
            "an absolute path",
        ),
        (
            "import s from '../../secret.js'\nexport default s".to_owned(),
            "outside the uploaded files",
        ),
        (
            "import s from '../../../../../../etc/passwd'\nexport default s".to_owned(),
            "outside the uploaded files",
        ),
        (
            "import s from 'file:///etc/passwd'\nexport default s".to_owned(),
            "URL imports",
        ),
    ] {
        let e = b
            .bundle_raw([("src/index.ts", entry.as_str())])
            .await
            .unwrap_err();
        assert_eq!(e.code(), "BUNDLE_FAILED");
        assert!(e.message.contains(needle), "{needle}: {}", e.message);
        assert!(!e.message.contains("host secret"));
    }
    // A tenant tsconfig cannot map an import onto host files either.
    let tsconfig = format!(
        r#"{{"compilerOptions": {{"baseUrl": ".", "paths": {{"x": [{:?}]}}}}}}"#,
        secret.display().to_string()
    );
    let r = b
        .bundle_raw([
            ("tsconfig.json", tsconfig.as_str()),
            ("src/index.ts", "import s from 'x'\nexport default s"),
        ])
        .await;
    match r {
        Ok(bundle) => panic!("bundled host file: {}", bundle.code),
        Err(e) => assert!(!e.message.contains("host secret"), "{}", e.message),
    }
}

#[tokio::test]
async fn type_only_imports_of_absent_packages_are_fine() {
    let (b, _w) = bundler();
    let bundle = b
        .bundle_raw([(
            "src/index.ts",
            "import type { ExecutionContext } from '@cloudflare/workers-types'\nexport default { fetch(_r: Request, _e: unknown, _c: ExecutionContext) { return new Response('ok') } }",
        )])
        .await
        .unwrap();
    assert!(bundle.code.contains("ok"));
}
