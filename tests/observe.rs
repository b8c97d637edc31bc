//! The HTTP listener: `/metrics` read by a Prometheus parser and checked against `INFO` after
//! known traffic, bucket crashes and restarts counted, `/health`, `/ready`, the page and its
//! JSON.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::{Binary, Raw, http_get as get};

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Counter(value)
        | prometheus_parse::Value::Gauge(value)
        | prometheus_parse::Value::Untyped(value) => *value,
        other => panic!("{name} is {other:?}"),
    }
}

fn info_field(info: &str, name: &str) -> f64 {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in INFO"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_what_info_counts_by_command_and_result() {
    let directory = tempfile::tempdir().unwrap();
    let data_dir = directory.path().to_str().unwrap().to_owned();
    let server = Binary::start(&["--data-dir", &data_dir, "--enable-debug-commands"]);
    let http = server.http_address();
    let mut client = Raw::connect(server.address).await;
    client.send(b"CREATE shop\n").await;
    client.expect(b"OK\r\n").await;
    for index in 0..20 {
        client
            .send(format!("PUT shop k{index} v\n").as_bytes())
            .await;
        client.expect(b"OK\r\n").await;
    }
    for _ in 0..7 {
        client.send(b"GET shop k1\n").await;
        client.expect(b"v\r\nOK\r\n").await;
    }
    client.send(b"GET nowhere k\nFLY away\nDELETE shop\n").await;
    client
        .expect(b"NOT FOUND\r\nUNKNOWN COMMAND\r\nUNKNOWN COMMAND\r\n")
        .await;
    client.send(b"PUT shop\n").await;
    client.expect(b"UNKNOWN COMMAND\r\n").await;
    // The busiest bucket first: every read, write and delete of a key counts.
    client.send(b"CREATE quiet\n").await;
    client.expect(b"OK\r\n").await;
    let (_, busiest) = get(http, "/api/buckets?sort=operations").await;
    let busiest: serde_json::Value = serde_json::from_str(&busiest).unwrap();
    assert_eq!(busiest["buckets"][0]["name"], "shop");
    assert_eq!(busiest["buckets"][0]["operations"], 27);
    assert_eq!(busiest["buckets"][1]["operations"], 0);
    client.send(b"DROP quiet\n").await;
    client.expect(b"OK\r\n").await;
    // A bucket crashes and comes back from disk.
    client.send(b"DEBUG CRASH shop\n").await;
    client.expect(b"OK\r\n").await;

    let (status, text) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    let metrics = scrape(&text);
    client.send(b"INFO\n").await;
    let info = String::from_utf8(client.lines_until(b"OK\r\n").await).unwrap();
    let requests = |command: &str, result: &str| {
        value(
            &metrics,
            "kv_requests_total",
            &[("command", command), ("result", result)],
        )
    };
    assert_eq!(requests("create", "ok"), 2.0);
    assert_eq!(requests("drop", "ok"), 1.0);
    assert_eq!(requests("put", "ok"), 20.0);
    // A missing bucket is an answer (INFO counts no error for it).
    assert_eq!(requests("get", "ok"), 8.0);
    assert_eq!(requests("debug", "ok"), 1.0);
    assert_eq!(requests("(not a command)", "error"), 3.0);
    let total: f64 = metrics
        .samples
        .iter()
        .filter(|sample| sample.metric == "kv_requests_total")
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value) => value,
            _ => 0.0,
        })
        .sum();
    assert_eq!(total, info_field(&info, "total_commands_processed"));
    let errors: f64 = metrics
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == "kv_requests_total" && sample.labels.get("result") == Some("error")
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value) => value,
            _ => 0.0,
        })
        .sum();
    assert_eq!(errors, info_field(&info, "total_error_replies"));
    assert_eq!(value(&metrics, "kv_keys", &[]), info_field(&info, "keys"));
    assert_eq!(value(&metrics, "kv_buckets", &[]), 1.0);
    assert_eq!(
        value(&metrics, "kv_memory_used_bytes", &[]),
        info_field(&info, "used_memory")
    );
    assert_eq!(value(&metrics, "kv_bucket_crashes_total", &[]), 1.0);
    assert_eq!(value(&metrics, "kv_bucket_restarts_total", &[]), 1.0);
    assert_eq!(value(&metrics, "kv_connections_open", &[]), 1.0);
    let latency = metrics
        .samples
        .iter()
        .find(|sample| {
            sample.metric == "kv_request_duration_seconds"
                && sample.labels.get("command") == Some("put")
        })
        .unwrap();
    let prometheus_parse::Value::Histogram(buckets) = &latency.value else {
        panic!("a histogram: {latency:?}");
    };
    let infinite = buckets.iter().find(|bucket| bucket.less_than.is_infinite());
    assert_eq!(infinite.map(|bucket| bucket.count), Some(20.0));

    assert_eq!(get(http, "/health").await.0, 200);
    assert_eq!(get(http, "/ready").await, (200, "ready\n".to_owned()));
    let (status, page) = get(http, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>kv</title>"));
    let (_, state) = get(http, "/api/state").await;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["tree"]["bucket_supervisor"]["buckets"], 1);
    assert_eq!(state["keys"], 20);
    let (_, listing) = get(http, "/api/buckets?q=sh&sort=keys").await;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["total"], 1);
    assert_eq!(listing["buckets"][0]["name"], "shop");
    assert_eq!(listing["buckets"][0]["keys"], 20);
    assert_eq!(listing["buckets"][0]["state"], "running");
    assert_eq!(listing["buckets"][0]["restarts"], 1);
}

#[test]
fn http_bind_off_serves_no_http() {
    let server = Binary::start(&["--http-bind", "off"]);
    server.log_line("workers:");
    assert!(
        !server.logs().iter().any(|line| line.contains("metrics on")),
        "{:?}",
        server.logs()
    );
}

/// The default HTTP address (the client port + 5081) is not one the user asked for: taken (or
/// past 65535), the server starts without it and says so; one given by name is required.
#[test]
fn a_taken_default_http_address_is_given_up_and_a_named_one_is_not() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Whoever holds it, the default address is not free while this lives.
    let taken = port
        .checked_add(5081)
        .and_then(|http| std::net::TcpListener::bind(("127.0.0.1", http)).ok());
    let server = Binary::start(&["--port", &port.to_string()]);
    let warning = server.log_line("no metrics or status page");
    assert!(warning.contains("--http-bind"), "{warning}");

    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let named = holder.local_addr().unwrap().to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["serve", "--port", "0", "--http-bind", &named])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&named), "{stderr}");
    drop(taken);
}
