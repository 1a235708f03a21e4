//! API tests against a real `den server` (see common.rs). Run as root.
//! `cargo test -p den-server --test api -- NAME…` runs the tests whose
//! names contain one of the NAMEs.

mod abuse;
mod abuse_exec;
mod apirest;
mod common;
mod console;
mod control;
mod exec;
mod forward;
mod fs;
mod fuzz;
mod mcp;
mod memory;
mod org_tokens;
mod pool;
mod proxy;
mod quotas_org;
mod runtime;
mod sdk;
mod sdk_isolation;
mod sdk_rust;
mod services;
mod sprites;
mod svcfs_python;
mod tenancy;
mod tls;

use den_runtime::Runtime;
use std::future::Future;
use std::pin::Pin;

type TestFn = fn() -> Pin<Box<dyn Future<Output = anyhow::Result<()>>>>;

/// Every test, by name. Areas add their tests here.
const TESTS: &[(&str, TestFn)] = &[
    ("memory_checkpoint_restore", || {
        Box::pin(memory::memory_checkpoint_restore())
    }),
    ("apirest_restart_check_and_timestamps", || {
        Box::pin(apirest::restart_check_and_timestamps())
    }),
    ("apirest_watch_sprites_keeps_to_the_tokens_reach", || {
        Box::pin(apirest::watch_sprites_keeps_to_the_tokens_reach())
    }),
    ("apirest_ports_and_fs_watch", || {
        Box::pin(apirest::ports_and_fs_watch())
    }),
    ("apirest_chown_route", || Box::pin(apirest::chown_route())),
    ("apirest_watch_sprites_lagging_client_is_resynced", || {
        Box::pin(apirest::watch_sprites_lagging_client_is_resynced())
    }),
    ("apirest_validation_errors_list_form", || {
        Box::pin(apirest::validation_errors_list_form())
    }),
    ("sprites_crud_and_auth", || Box::pin(sprites::crud_and_auth())),
    ("runtime_per_sprite_choice", || {
        Box::pin(runtime::per_sprite_choice())
    }),
    ("runtime_server_default_gvisor", || {
        Box::pin(runtime::server_default_gvisor())
    }),
    ("pool_create_claims_a_hidden_sprite", || {
        Box::pin(pool::pool_create_claims_a_hidden_sprite())
    }),
    ("sprites_tokens_and_restart", || {
        Box::pin(sprites::tokens_and_restart())
    }),
    ("policy_validation", || Box::pin(sprites::policy_validation())),
    ("checkpoints_ndjson", || Box::pin(sprites::checkpoints_ndjson())),
    ("limits_metrics_request_ids", || {
        Box::pin(sprites::limits_metrics_request_ids())
    }),
    ("api_fuzz", || Box::pin(fuzz::api_fuzz())),
    ("sdk_python", || Box::pin(sdk::python_sdk(Runtime::Native))),
    ("sdk_python_gvisor", || Box::pin(sdk::python_sdk(Runtime::Gvisor))),
    ("sdk_js", || Box::pin(sdk::js_sdk(Runtime::Native))),
    ("sdk_js_gvisor", || Box::pin(sdk::js_sdk(Runtime::Gvisor))),
    ("sdk_isolation", || {
        Box::pin(sdk_isolation::sdk_isolation(Runtime::Native))
    }),
    ("sdk_isolation_gvisor", || {
        Box::pin(sdk_isolation::sdk_isolation(Runtime::Gvisor))
    }),
    ("sdk_rust", || Box::pin(sdk_rust::rust_sdk(Runtime::Native))),
    ("sdk_rust_gvisor", || {
        Box::pin(sdk_rust::rust_sdk(Runtime::Gvisor))
    }),
    ("services_lifecycle", || Box::pin(services::lifecycle())),
    ("fs_operations", || Box::pin(fs::operations())),
    ("fs_confinement", || Box::pin(fs::confinement())),
    ("services_fs_python_sdk", || {
        Box::pin(svcfs_python::python_sdk(Runtime::Native))
    }),
    ("services_fs_python_sdk_gvisor", || {
        Box::pin(svcfs_python::python_sdk(Runtime::Gvisor))
    }),
    ("proxy_tunnel", || Box::pin(proxy::tunnel(Runtime::Native))),
    ("proxy_tunnel_gvisor", || Box::pin(proxy::tunnel(Runtime::Gvisor))),
    ("url_proxy", || Box::pin(proxy::urls())),
    ("url_upgrade", || Box::pin(proxy::url_upgrade())),
    ("url_bulk_upload_and_download_intact", || {
        Box::pin(proxy::url_bulk_upload_and_download_intact())
    }),
    ("url_wakes_cold", || Box::pin(proxy::url_wakes_cold())),
    ("url_plain_bodies_spliced", || {
        Box::pin(proxy::url_plain_bodies_spliced())
    }),
    ("url_reuses_upstream_connections", || {
        Box::pin(proxy::url_reuses_upstream_connections())
    }),
    ("exec_ws_protocol", || {
        Box::pin(exec::ws_protocol(Runtime::Native))
    }),
    ("exec_ws_protocol_gvisor", || {
        Box::pin(exec::ws_protocol(Runtime::Gvisor))
    }),
    ("exec_tty_attach_http", || {
        Box::pin(exec::tty_attach_http(Runtime::Native))
    }),
    ("exec_tty_attach_http_gvisor", || {
        Box::pin(exec::tty_attach_http(Runtime::Gvisor))
    }),
    ("exec_default_timeout", || Box::pin(exec::default_timeout())),
    ("exec_http_exit_frame_apart_from_queued_output", || {
        Box::pin(exec::http_exit_frame_apart_from_queued_output(Runtime::Native))
    }),
    ("exec_http_exit_frame_apart_from_queued_output_gvisor", || {
        Box::pin(exec::http_exit_frame_apart_from_queued_output(Runtime::Gvisor))
    }),
    ("cluster_forwarding", || Box::pin(forward::cluster_forwarding())),
    ("forged_peer_claims_gain_nothing", || {
        Box::pin(forward::forged_peer_claims_gain_nothing())
    }),
    ("wire_pooled_stream_has_no_fixed_delay", || {
        Box::pin(abuse::wire_pooled_stream_has_no_fixed_delay())
    }),
    ("abuse_connection_flood_and_slowloris", || {
        Box::pin(abuse::abuse_connection_flood_and_slowloris())
    }),
    ("early_error_closes_the_connection_it_announces", || {
        Box::pin(abuse::early_error_closes_the_connection_it_announces())
    }),
    ("limits_beyond_the_host_are_refused", || {
        Box::pin(abuse::limits_beyond_the_host_are_refused())
    }),
    ("race_lifecycle_never_answers_500", || {
        Box::pin(abuse::race_lifecycle_never_answers_500(Runtime::Native))
    }),
    ("race_lifecycle_never_answers_500_gvisor", || {
        Box::pin(abuse::race_lifecycle_never_answers_500(Runtime::Gvisor))
    }),
    ("abuse_space_comes_back_after_delete", || {
        Box::pin(abuse::abuse_space_comes_back_after_delete())
    }),
    ("abuse_unread_exec_streams_stay_bounded", || {
        Box::pin(abuse_exec::abuse_unread_exec_streams_stay_bounded(
            Runtime::Native,
        ))
    }),
    ("abuse_unread_exec_streams_stay_bounded_gvisor", || {
        Box::pin(abuse_exec::abuse_unread_exec_streams_stay_bounded(
            Runtime::Gvisor,
        ))
    }),
    ("tenancy_authorization_matrix", || {
        Box::pin(tenancy::authorization_matrix())
    }),
    ("tenancy_lists_keep_to_the_tokens_reach", || {
        Box::pin(tenancy::lists_keep_to_the_tokens_reach())
    }),
    ("quotas_org_sprite_count_and_create_rate", || {
        Box::pin(quotas_org::sprite_count_and_create_rate())
    }),
    ("quotas_org_awake_memory_cpu_on_wake", || {
        Box::pin(quotas_org::awake_memory_cpu_on_wake())
    }),
    ("quotas_org_disk_bytes_on_create_fork_checkpoint", || {
        Box::pin(quotas_org::disk_bytes_on_create_fork_checkpoint())
    }),
    ("tls_sdks_over_https", || Box::pin(tls::sdks_over_https())),
    ("tls_sprite_url_over_https", || {
        Box::pin(tls::sprite_url_over_https())
    }),
    ("tls_sighup_reload_under_traffic", || {
        Box::pin(tls::sighup_reload_under_traffic())
    }),
    ("tls_silent_client_is_closed_by_the_deadline", || {
        Box::pin(tls::silent_tls_client_is_closed_by_the_deadline())
    }),
    ("tls_mismatched_key_stops_the_start", || {
        Box::pin(tls::mismatched_key_stops_the_start())
    }),
    ("control_js_sdk", || Box::pin(control::js_sdk())),
    ("control_python_sdk", || Box::pin(control::python_sdk())),
    ("control_frames_and_access", || {
        Box::pin(control::frames_and_access())
    }),
    ("control_limits_and_detach", || {
        Box::pin(control::limits_and_detach())
    }),
    ("tenancy_token_minting_escalation", || {
        Box::pin(org_tokens::token_minting_escalation())
    }),
    ("tenancy_migration_from_pre_org_data_dir", || {
        Box::pin(org_tokens::migration_from_pre_org_data_dir())
    }),
    ("console_ws_token_subprotocol", || {
        Box::pin(console::ws_token_subprotocol())
    }),
    ("console_browser_flow", || Box::pin(console::browser_flow())),
    ("console_browser_settings_and_access", || {
        Box::pin(console::browser_settings_and_access())
    }),
    ("mcp_python_sdk", || Box::pin(mcp::python_sdk())),
    ("mcp_refuses_what_rest_refuses", || {
        Box::pin(mcp::refuses_what_rest_refuses())
    }),
    ("mcp_sessions_at_the_handshake_revisions", || {
        Box::pin(mcp::sessions_at_the_handshake_revisions())
    }),
];

fn main() {
    common::dispatch_subcommands();
    assert!(nix::unistd::geteuid().is_root(), "the API tests need root");
    // reqwest is built without a crypto provider (issue 15: no aws-lc-rs)
    // and panics building a client, even for http://, without a default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = den_testkit::runner::run_named(TESTS, |t| rt.block_on(t()));
    drop(rt);
    if !ok {
        std::process::exit(1);
    }
}

fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,libcgroups=error,fuser=error,den_block=error".into()),
        )
        .with_test_writer()
        .try_init()
}
