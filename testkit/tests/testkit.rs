//! Proves that each testkit fault really happens on a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use testkit::{RedisCluster, RedisConfig, RedisNodes, RedisServer};

fn process_exists(pid: u32) -> bool {
    // Signal 0 checks existence; a reaped child is gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[test]
fn start_answers_ping_and_kill_refuses_connections() {
    let mut server = RedisServer::start().unwrap();
    assert_eq!(server.cmd::<String>(&["PING"]).unwrap(), "PONG");
    // No persistence unless asked.
    let aof: Vec<String> = server.cmd(&["CONFIG", "GET", "appendonly"]).unwrap();
    assert_eq!(aof, vec!["appendonly".to_string(), "no".to_string()]);
    let save: Vec<String> = server.cmd(&["CONFIG", "GET", "save"]).unwrap();
    assert_eq!(save, vec!["save".to_string(), String::new()]);
    let pid = server.pid().unwrap();
    server.kill().unwrap();
    assert!(!process_exists(pid));
    assert!(server.connection().is_err(), "a killed server must refuse connections");
}

#[test]
fn paused_node_times_out_and_resumed_node_answers() {
    let mut server = RedisServer::start().unwrap();
    let mut con = server.connection().unwrap();
    con.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    server.pause().unwrap();
    let err = redis::cmd("PING").query::<String>(&mut con).unwrap_err();
    assert!(err.is_timeout() || err.is_io_error(), "expected a timeout, got {err}");
    server.resume().unwrap();
    assert_eq!(server.cmd::<String>(&["PING"]).unwrap(), "PONG");
}

#[test]
fn restart_keeps_the_port_and_aof_keeps_the_data() {
    let mut server = RedisServer::start_with(RedisConfig::new().aof(true)).unwrap();
    let port = server.port();
    let _: () = server.cmd(&["SET", "k", "survives"]).unwrap();
    server.kill().unwrap();
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(server.cmd::<String>(&["GET", "k"]).unwrap(), "survives");
}

#[test]
fn restart_without_aof_loses_the_data() {
    let mut server = RedisServer::start().unwrap();
    let _: () = server.cmd(&["SET", "k", "gone"]).unwrap();
    server.restart().unwrap();
    assert_eq!(server.cmd::<Option<String>>(&["GET", "k"]).unwrap(), None);
}

#[test]
fn drop_kills_the_process_even_when_the_test_panics() {
    let pid = std::thread::spawn(|| {
        let server = RedisServer::start().unwrap();
        let pid = server.pid().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _server = server;
            panic!("test body failed");
        }));
        assert!(result.is_err());
        pid
    })
    .join()
    .unwrap();
    assert!(!process_exists(pid), "redis-server {pid} outlived its owner");
}

#[test]
fn drop_kills_a_paused_process() {
    let mut server = RedisServer::start().unwrap();
    let pid = server.pid().unwrap();
    server.pause().unwrap();
    drop(server);
    assert!(!process_exists(pid));
}

#[test]
fn nodes_are_independent_masters() {
    let mut nodes = RedisNodes::start(3).unwrap();
    assert_eq!(nodes.len(), 3);
    let urls = nodes.urls();
    assert_eq!(urls.iter().collect::<std::collections::HashSet<_>>().len(), 3);
    let _: () = nodes[0].cmd(&["SET", "only-here", "1"]).unwrap();
    assert_eq!(nodes[1].cmd::<Option<String>>(&["GET", "only-here"]).unwrap(), None);
    let role: Vec<redis::Value> = nodes[2].cmd(&["ROLE"]).unwrap();
    assert_eq!(redis::from_redis_value_ref::<String>(&role[0]).unwrap(), "master");
    nodes[1].pause().unwrap();
    assert_eq!(nodes[0].cmd::<String>(&["PING"]).unwrap(), "PONG");
    nodes[1].resume().unwrap();
}

#[test]
fn cluster_routes_keys_to_different_masters() {
    let cluster = RedisCluster::start(3).unwrap();
    let info: String = cluster[0].cmd(&["CLUSTER", "INFO"]).unwrap();
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_slots_assigned:16384"), "{info}");

    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut con = client.get_connection().unwrap();
    for i in 0..300 {
        let _: () = redis::cmd("SET").arg(format!("key:{i}")).arg(i).query(&mut con).unwrap();
    }
    let per_node: Vec<i64> = cluster.iter().map(|node| node.cmd(&["DBSIZE"]).unwrap()).collect();
    assert_eq!(per_node.iter().sum::<i64>(), 300);
    assert!(per_node.iter().all(|&n| n > 0), "keys not spread over all masters: {per_node:?}");

    // The owner reported by node_for_key really holds the key.
    let owner = cluster.node_for_key("key:7").unwrap();
    assert_eq!(cluster[owner].cmd::<Option<String>>(&["GET", "key:7"]).unwrap().as_deref(), Some("7"));
}

#[test]
fn missing_binary_says_how_to_install() {
    let config = RedisConfig::new().binary("/nonexistent/redis-server");
    let err = RedisServer::start_with(config).unwrap_err();
    assert!(matches!(err, testkit::Error::NotInstalled(_)), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("apt-get install"), "{err}");
    assert!(err.contains("brew install redis"), "{err}");
}
