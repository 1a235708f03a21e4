//! `den-bench cluster`: cluster mode measured from its clients — PostgreSQL,
//! SeaweedFS S3 and `den server` nodes, each node in its own network
//! namespace as a separate host (`den_testkit::cluster`), all started by this
//! process and driven over HTTP and WebSocket from the root namespace.
//!
//! 1. Create throughput: creates (POST + first exec) with a fixed concurrency
//!    through one node, on a 1-node and then on a 3-node cluster.
//! 2. Cold wake: the first exec after a sprite went cold, on the node that ran
//!    it (local chunk cache warm) vs on another node after the first one was
//!    drained (ownership claim + lazy fetch from S3).
//! 3. Forwarding: exec `true` round trips through the sprite's owner vs through
//!    a node that forwards to the owner.
//!
//! Order matters: the 1-node figures need node a alone; the wake sprites are
//! created there too, so that draining a once releases all of them; and the
//! 3-node creates must happen before a is drained.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use den_testkit::SeaweedS3;
use den_testkit::cluster::{DenNode, Hosts, NodeOptions};
use den_testkit::postgres::TestPostgres;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::api_bench::Api;
use crate::cancel;
use crate::report::TextTable;
use crate::sprite_bench::fmt_ms;

/// The nodes, in start order: a alone is the 1-node cluster.
pub const NODES: [&str; 3] = ["a", "b", "c"];
/// Every node is in this region, so creates spread over all live nodes.
const REGION: &str = "bench";
const NODE_TTL: &str = "3s";
const DURABILITY_WINDOW: &str = "1s";
/// Longest any polled condition (durable, cold, drained) may take.
const PATIENCE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);
/// Per-request timeout of the HTTP client; the exec WebSocket has its own (60 s).
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the wake sprites keep their data.
const DATA_DIR: &str = "/home/sprite/bench";
/// Size of each data file.
const FILE_MIB: u64 = 4;

#[derive(Debug, Clone)]
pub struct ClusterBenchOptions {
    /// Node data dirs are `<work>/nodes/<name>`; their `images` subdirs are kept between runs.
    pub work: PathBuf,
    /// The `den` binary the nodes run.
    pub den_exe: PathBuf,
    /// Creates per cluster size.
    pub creates: usize,
    /// Creates in flight at once.
    pub concurrency: usize,
    /// Sprites in the cold-wake test.
    pub wake_sprites: usize,
    /// Data written into each wake sprite, in MiB (files of 4 MiB).
    pub wake_mib: u64,
    /// Exec round trips per path in the forwarding test.
    pub exec_samples: usize,
    /// The nodes' `--warm-after` and `--cold-after`: short, so sprites go cold quickly.
    pub warm_after: Duration,
    pub cold_after: Duration,
}

impl ClusterBenchOptions {
    pub fn new(work: PathBuf, den_exe: PathBuf, quick: bool) -> Self {
        ClusterBenchOptions {
            work,
            den_exe,
            creates: if quick { 10 } else { 30 },
            concurrency: 6,
            wake_sprites: if quick { 2 } else { 5 },
            wake_mib: 32,
            exec_samples: if quick { 20 } else { 100 },
            warm_after: Duration::from_secs(1),
            cold_after: Duration::from_secs(2),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "busybox image; PostgreSQL 15, SeaweedFS S3 and every node on this machine, each node in its own \
             network namespace on one bridge; nodes run `den server --warm-after {} --cold-after {} \
             --durability-window {DURABILITY_WINDOW} --node-ttl {NODE_TTL}`, all in region `{REGION}`; \
             the client is this process in the root namespace",
            humantime::format_duration(self.warm_after),
            humantime::format_duration(self.cold_after),
        )
    }

    fn wake_files(&self) -> u64 {
        self.wake_mib.div_ceil(FILE_MIB).max(1)
    }

    /// Bytes in each wake sprite's data files.
    pub fn wake_bytes(&self) -> u64 {
        self.wake_files() * (FILE_MIB << 20)
    }
}

/// One create run (one cluster size).
#[derive(Debug, Default, Clone)]
pub struct CreateRun {
    pub nodes: usize,
    /// POST /v1/sprites until its 201.
    pub post: Vec<Duration>,
    /// POST, then the first exec `true` (the sprite boots on its node) until its exit.
    pub total: Vec<Duration>,
    pub errors: usize,
    pub first_error: Option<String>,
    /// From the first create's start to the last one's end.
    pub wall: Duration,
    /// Sprites per node, from `GET /v1/sprites/{name}`'s `node`.
    pub placement: BTreeMap<String, usize>,
}

impl CreateRun {
    pub fn per_second(&self) -> Option<f64> {
        (!self.total.is_empty() && !self.wall.is_zero())
            .then(|| self.total.len() as f64 / self.wall.as_secs_f64())
    }
}

/// The first exec of a sprite that was cold.
#[derive(Debug, Clone)]
pub struct WakeSample {
    pub sprite: String,
    /// The node the request went to.
    pub via: String,
    /// The node that ran it afterwards.
    pub ran_on: String,
    pub took: Duration,
}

#[derive(Debug, Default)]
pub struct ClusterBenchResults {
    pub one: CreateRun,
    pub three: CreateRun,
    /// First exec through the node that ran the sprite before it went cold.
    pub wake_same: Vec<WakeSample>,
    /// First exec through another node, after the first one was drained.
    pub wake_moved: Vec<WakeSample>,
    pub wake_errors: usize,
    pub wake_first_error: Option<String>,
    /// How long `POST /v1/nodes/a/drain` took until the node was reported drained.
    pub drain: Option<Duration>,
    /// Owner and forwarding node of the forwarding test.
    pub fwd_owner: String,
    pub fwd_via: String,
    pub exec_owner: Vec<Duration>,
    pub exec_forwarded: Vec<Duration>,
    pub exec_errors: usize,
}

/// PostgreSQL, S3, the hosts and the nodes. Fields drop in order: nodes before the servers
/// and namespaces they use.
struct Cluster {
    nodes: Vec<Option<DenNode>>,
    s3: SeaweedS3,
    pg: TestPostgres,
    hosts: Hosts,
    /// One client per node, filled as nodes start.
    apis: Vec<Option<Api>>,
    token: Option<String>,
    http: reqwest::Client,
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let hosts = Hosts::create(NODES.len()).context("creating the host namespaces")?;
        let mut pg = TestPostgres::start().context("starting PostgreSQL")?;
        pg.listen_on_all().context("PostgreSQL on the bridge")?;
        let s3 = SeaweedS3::start_on(hosts.host_ip()).context("starting SeaweedFS")?;
        // The nodes are on a private bridge: a proxy from the environment must not be used.
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()?;
        Ok(Cluster {
            nodes: NODES.iter().map(|_| None).collect(),
            s3,
            pg,
            hosts,
            apis: NODES.iter().map(|_| None).collect(),
            token: None,
            http,
        })
    }

    /// Starts node `i` and waits until it answers.
    fn start_node(&mut self, i: usize, opts: &ClusterBenchOptions) -> Result<()> {
        let name = NODES[i];
        let db = self.pg.url_via(&self.hosts.host_ip().to_string());
        let store = format!(
            "s3://{}?endpoint={}&region={}",
            self.s3.bucket(),
            self.s3.endpoint(),
            self.s3.region()
        );
        let mut o = NodeOptions::new(&opts.den_exe, node_dir(&opts.work, name));
        o.extra_args = vec![
            "--cluster-db".into(),
            db,
            "--object-store".into(),
            store,
            "--node-name".into(),
            name.into(),
            "--region".into(),
            REGION.into(),
            "--advertise-url".into(),
            format!("http://{}:{}", self.hosts.ip(i), o.port),
            "--durability-window".into(),
            DURABILITY_WINDOW.into(),
            "--node-ttl".into(),
            NODE_TTL.into(),
            "--warm-after".into(),
            humantime::format_duration(opts.warm_after).to_string(),
            "--cold-after".into(),
            humantime::format_duration(opts.cold_after).to_string(),
        ];
        o.env = vec![
            ("AWS_ACCESS_KEY_ID".into(), self.s3.access_key().into()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.s3.secret_key().into()),
        ];
        let node = DenNode::start(&self.hosts, i, &o).with_context(|| format!("starting node {name}"))?;
        // One admin token for the whole cluster, minted by the first node.
        if self.token.is_none() {
            self.token = Some(
                node.admin_token()
                    .context("the first node wrote no admin token")?,
            );
        }
        let addr = SocketAddr::from((node.ip(), o.port));
        self.apis[i] = Some(Api {
            addr,
            token: self.token.clone().unwrap_or_default(),
            http: self.http.clone(),
        });
        self.nodes[i] = Some(node);
        Ok(())
    }

    fn api(&self, name: &str) -> Result<&Api> {
        let i = node_index(name)?;
        self.apis[i]
            .as_ref()
            .with_context(|| format!("node {name} is not running"))
    }

    /// Every node's log tail, for error messages.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .zip(NODES)
            .filter_map(|(n, name)| n.as_ref().map(|n| format!("--- node {name}:\n{}", n.log_tail())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM every node (they stop their sprites and flush); what does not exit in time is
    /// killed and cleaned up by `DenNode`'s drop.
    fn stop_nodes(&mut self) {
        for (n, name) in self.nodes.iter_mut().zip(NODES) {
            if let Some(node) = n
                && let Err(e) = node.stop()
            {
                tracing::warn!(node = name, error = %format!("{e:#}"), "stopping a node");
            }
        }
    }
}

fn node_index(name: &str) -> Result<usize> {
    NODES
        .iter()
        .position(|n| *n == name)
        .with_context(|| format!("unknown node {name:?}"))
}

fn node_dir(work: &Path, name: &str) -> PathBuf {
    work.join("nodes").join(name)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Mount points from /proc/self/mountinfo.
fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// The node's log, kept after a run for a look at what happened.
const NODE_LOG: &str = "den-node.log";

/// Empties a node's data dir, except the built images (building them is the slow part of a
/// node's first start) and the entries named in `keep`. Never recurses into a mount.
fn clear_node_dir(dir: &Path, keep: &[&str]) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mounts = mount_points();
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name() == "images" || keep.iter().any(|k| e.file_name() == *k) {
            continue;
        }
        if mounts.iter().any(|m| m.starts_with(&p)) {
            bail!(
                "{} still has a mount under it (a previous run was killed?); unmount it first",
                p.display()
            );
        }
        let r = if e.file_type()?.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn prepare_work(opts: &ClusterBenchOptions) -> Result<()> {
    // Sprite processes run as other users and must reach the node dirs' contents.
    for d in [opts.work.clone(), opts.work.join("nodes")] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o711))?;
    }
    for name in NODES {
        clear_node_dir(&node_dir(&opts.work, name), &[])?;
    }
    Ok(())
}

/// Run the whole benchmark. PostgreSQL, SeaweedFS, the namespaces and every node are torn
/// down on success, error and the first Ctrl-C.
pub fn run(opts: &ClusterBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<ClusterBenchResults> {
    ensure!(
        opts.creates > 0 && opts.concurrency > 0,
        "creates and concurrency must be positive"
    );
    ensure!(opts.wake_sprites > 0, "at least one wake sprite");
    prepare_work(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    progress(&format!(
        "starting PostgreSQL, SeaweedFS and {} host namespaces",
        NODES.len()
    ));
    let mut cluster = Cluster::start()?;
    let mut res = ClusterBenchResults::default();
    let outcome = measure(&rt, &mut cluster, opts, &mut res, progress);
    if let Err(e) = &outcome
        && !e.chain().any(|c| c.is::<cancel::Interrupted>())
    {
        let logs = cluster.logs();
        if !logs.is_empty() {
            progress(&format!("failed; the running nodes' logs end with:\n{logs}"));
        }
    }
    progress("stopping the nodes, SeaweedFS and PostgreSQL; removing the namespaces");
    cluster.stop_nodes();
    drop(cluster);
    drop(rt);
    if let Err(e) = (|| -> Result<()> {
        for name in NODES {
            clear_node_dir(&node_dir(&opts.work, name), &[NODE_LOG])?;
        }
        Ok(())
    })() {
        tracing::warn!(error = %format!("{e:#}"), "cleaning the node dirs");
    }
    progress(&format!(
        "the nodes' logs are kept in {}",
        node_dir(&opts.work, &format!("{{{}}}", NODES.join(",")))
            .join(NODE_LOG)
            .display()
    ));
    outcome.map(|()| res)
}

fn measure(
    rt: &tokio::runtime::Runtime,
    c: &mut Cluster,
    opts: &ClusterBenchOptions,
    res: &mut ClusterBenchResults,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    progress("starting node a (the first start of a data dir builds the busybox image)");
    c.start_node(0, opts)?;
    cancel::check()?;

    // -- 1-node creates ----------------------------------------------------
    progress("1-node cluster: warm-up create (makes the disk template once)");
    rt.block_on(warm_up(c, &["w1-0"]))?;
    progress(&format!(
        "1-node cluster: {} creates (POST + first exec) through a, {} at a time",
        opts.creates, opts.concurrency
    ));
    res.one = rt.block_on(create_run(c, opts, "c1-", 1))?;
    rt.block_on(delete_all(c, "a", &names("c1-", opts.creates)));
    cancel::check()?;

    // -- wake sprites, all on a --------------------------------------------
    let wake = names("w-", opts.wake_sprites);
    progress(&format!(
        "cold wake: {} sprites on a, {} MiB of random files each, until durable in S3",
        wake.len(),
        opts.wake_bytes() >> 20
    ));
    let sums = rt.block_on(write_wake_data(c, opts, &wake))?;
    cancel::check()?;

    // -- 3-node creates ----------------------------------------------------
    progress("starting nodes b and c");
    for i in 1..NODES.len() {
        c.start_node(i, opts)?;
        cancel::check()?;
    }
    progress("3-node cluster: warm-up creates (each node makes its disk template once)");
    rt.block_on(warm_up(c, &["w3-0", "w3-1", "w3-2"]))?;
    progress(&format!(
        "3-node cluster: {} creates (POST + first exec) through a, {} at a time",
        opts.creates, opts.concurrency
    ));
    res.three = rt.block_on(create_run(c, opts, "c3-", 3))?;
    rt.block_on(delete_all(c, "a", &names("c3-", opts.creates)));
    cancel::check()?;

    // -- cold wake on a, then on another node after draining a -------------
    progress("cold wake: first exec through a, the node that ran them (local cache warm)");
    rt.block_on(wake_same_node(c, opts, &wake, &sums, res))?;
    progress("cold wake: drain a, then first exec through b or c (claim + lazy fetch from S3)");
    rt.block_on(wake_after_drain(c, opts, &wake, &sums, res))?;
    cancel::check()?;

    // -- forwarding --------------------------------------------------------
    progress(&format!(
        "forwarding: exec `true` ×{} through the owner and through the other live node, interleaved",
        opts.exec_samples
    ));
    rt.block_on(forwarding(c, opts, res))?;
    Ok(())
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

async fn create(api: &Api, name: &str) -> Result<()> {
    let r = api
        .http
        .post(api.url("/v1/sprites"))
        .bearer_auth(&api.token)
        .json(&json!({ "name": name, "config": { "region": REGION } }))
        .send()
        .await?;
    let status = r.status();
    if status != 201 {
        bail!("create {name}: {status} {}", r.text().await.unwrap_or_default());
    }
    Ok(())
}

async fn get_json(api: &Api, path: &str) -> Result<Value> {
    let r = api.http.get(api.url(path)).bearer_auth(&api.token).send().await?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    ensure!(status == 200, "GET {path}: {status} {text}");
    serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON: {text}"))
}

async fn sprite(api: &Api, name: &str) -> Result<Value> {
    get_json(api, &format!("/v1/sprites/{name}")).await
}

async fn sprite_node(api: &Api, name: &str) -> Result<String> {
    let s = sprite(api, name).await?;
    Ok(s["node"].as_str().unwrap_or_default().to_string())
}

/// Polls `cond` every [`POLL`] until it returns `Some`, for at most [`PATIENCE`].
async fn poll<T, F, Fut>(what: &str, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + PATIENCE;
    let mut last = String::new();
    loop {
        cancel::check()?;
        match cond().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("; last error: {e:#}"),
        }
        ensure!(Instant::now() < deadline, "{what}: not after {PATIENCE:?}{last}");
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_status(api: &Api, name: &str, want: &str) -> Result<()> {
    poll(&format!("{name} {want}"), || async {
        let s = sprite(api, name).await?;
        Ok((s["status"] == want).then_some(()))
    })
    .await
}

/// Until the sprite's writes up to `since_ms` are in the object store.
async fn wait_durable(api: &Api, name: &str, since_ms: i64) -> Result<()> {
    poll(&format!("{name} durable after {since_ms}"), || async {
        let s = sprite(api, name).await?;
        let d = &s["durability"];
        let at = d["durable_at_ms"].as_i64().unwrap_or(0);
        Ok((d["fully_durable"] == json!(true) || at > since_ms).then_some(()))
    })
    .await
}

/// Creates, boots and deletes `names` one by one: every node that gets one makes its disk
/// template outside the timed runs.
async fn warm_up(c: &Cluster, names: &[&str]) -> Result<()> {
    let api = c.api("a")?;
    for name in names {
        create(api, name).await?;
        api.exec(name, &["true"]).await?;
    }
    delete_all(c, "a", &names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).await;
    Ok(())
}

async fn delete_all(c: &Cluster, via: &str, names: &[String]) {
    let Ok(api) = c.api(via) else { return };
    for name in names {
        let r = api
            .http
            .delete(api.url(&format!("/v1/sprites/{name}")))
            .bearer_auth(&api.token)
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 204 || r.status() == 404 => {}
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                tracing::warn!(sprite = %name, %status, body, "deleting a bench sprite");
            }
            Err(e) => tracing::warn!(sprite = %name, error = %e, "deleting a bench sprite"),
        }
    }
}

async fn create_run(
    c: &Cluster,
    opts: &ClusterBenchOptions,
    prefix: &str,
    nodes: usize,
) -> Result<CreateRun> {
    let api = c.api("a")?;
    let all = names(prefix, opts.creates);
    let t0 = Instant::now();
    let outcomes: Vec<Result<(Duration, Duration), String>> = futures::stream::iter(all.iter())
        .map(|name| async move {
            if cancel::is_interrupted() {
                return Err("interrupted".to_string());
            }
            let t = Instant::now();
            create(api, name).await.map_err(|e| format!("{e:#}"))?;
            let post = t.elapsed();
            api.exec(name, &["true"])
                .await
                .map_err(|e| format!("{name}: first exec: {e:#}"))?;
            Ok((post, t.elapsed()))
        })
        .buffer_unordered(opts.concurrency)
        .collect()
        .await;
    let mut run = CreateRun {
        nodes,
        wall: t0.elapsed(),
        ..Default::default()
    };
    cancel::check()?;
    for o in outcomes {
        match o {
            Ok((post, total)) => {
                run.post.push(post);
                run.total.push(total);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    for name in &all {
        let node = sprite_node(api, name).await.unwrap_or_default();
        let node = if node.is_empty() { "?".to_string() } else { node };
        *run.placement.entry(node).or_default() += 1;
    }
    Ok(run)
}

/// Writes the data files and prints their checksum. `head -c`, not `dd bs=1M`: a read of
/// /dev/urandom may come back short, and dd counts it as a whole block.
fn data_script(opts: &ClusterBenchOptions) -> String {
    format!(
        "mkdir -p {DATA_DIR} && for i in $(seq {}); do head -c {} /dev/urandom > {DATA_DIR}/f$i || exit 1; done \
         && sync && cat {DATA_DIR}/* | sha256sum",
        opts.wake_files(),
        FILE_MIB << 20
    )
}

/// Checksum of every data file, as `data_script` prints it.
fn sum_script() -> String {
    format!("cat {DATA_DIR}/* | sha256sum")
}

/// The hash out of `sha256sum`'s `HASH  -`.
fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Reads every data file of a wake sprite; prints the byte count.
pub fn read_script() -> String {
    format!("cat {DATA_DIR}/* | wc -c")
}

/// Returns each sprite's data checksum.
async fn write_wake_data(
    c: &Cluster,
    opts: &ClusterBenchOptions,
    wake: &[String],
) -> Result<BTreeMap<String, String>> {
    let api = c.api("a")?;
    let script = data_script(opts);
    let mut sums = BTreeMap::new();
    for name in wake {
        create(api, name).await?;
        let out = api
            .exec(name, &["sh", "-c", script.as_str()])
            .await
            .with_context(|| format!("writing the data of {name}"))?;
        sums.insert(name.clone(), first_word(&out));
        let on = sprite_node(api, name).await?;
        ensure!(on == "a", "{name} runs on {on:?}, not on a (the only node)");
    }
    let since = now_ms();
    for name in wake {
        wait_durable(api, name, since).await?;
    }
    Ok(sums)
}

/// Times the first exec of the cold sprite `name` through `via` and checks that it read
/// every byte; then, untimed, that the data is what was written.
async fn first_exec(
    c: &Cluster,
    opts: &ClusterBenchOptions,
    name: &str,
    via: &str,
    sums: &BTreeMap<String, String>,
) -> Result<WakeSample> {
    let api = c.api(via)?;
    let t = Instant::now();
    let out = api.exec(name, &["sh", "-c", read_script().as_str()]).await?;
    let took = t.elapsed();
    let n: u64 = String::from_utf8_lossy(&out)
        .trim()
        .parse()
        .with_context(|| format!("{name}: wc printed {:?}", String::from_utf8_lossy(&out)))?;
    ensure!(
        n == opts.wake_bytes(),
        "{name}: read {n} bytes, want {}",
        opts.wake_bytes()
    );
    let sum = first_word(&api.exec(name, &["sh", "-c", sum_script().as_str()]).await?);
    let want = sums.get(name).map_or("", String::as_str);
    ensure!(
        sum == want,
        "{name}: the data changed: sha256 {sum}, written {want}"
    );
    Ok(WakeSample {
        sprite: name.to_string(),
        via: via.to_string(),
        ran_on: sprite_node(api, name).await.unwrap_or_default(),
        took,
    })
}

fn record_wake(res: &mut ClusterBenchResults, moved: bool, r: Result<WakeSample>) {
    match r {
        Ok(s) if moved => res.wake_moved.push(s),
        Ok(s) => res.wake_same.push(s),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "first exec after cold");
            res.wake_errors += 1;
            res.wake_first_error.get_or_insert(format!("{e:#}"));
        }
    }
}

async fn wake_same_node(
    c: &Cluster,
    opts: &ClusterBenchOptions,
    wake: &[String],
    sums: &BTreeMap<String, String>,
    res: &mut ClusterBenchResults,
) -> Result<()> {
    let api = c.api("a")?;
    for name in wake {
        wait_status(api, name, "cold").await?;
        let r = first_exec(c, opts, name, "a", sums).await;
        record_wake(res, false, r);
    }
    Ok(())
}

async fn wake_after_drain(
    c: &Cluster,
    opts: &ClusterBenchOptions,
    wake: &[String],
    sums: &BTreeMap<String, String>,
    res: &mut ClusterBenchResults,
) -> Result<()> {
    let b = c.api("b")?;
    for name in wake {
        wait_status(b, name, "cold").await?;
    }
    let t = Instant::now();
    let r = b
        .http
        .post(b.url("/v1/nodes/a/drain"))
        .bearer_auth(&b.token)
        .send()
        .await?;
    let status = r.status();
    ensure!(
        status.is_success(),
        "drain a: {status} {}",
        r.text().await.unwrap_or_default()
    );
    poll("node a drained", || async {
        let v = get_json(b, "/v1/nodes").await?;
        let drained = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == "a" && n["state"] == "drained");
        Ok(drained.then_some(()))
    })
    .await?;
    res.drain = Some(t.elapsed());
    for (i, name) in wake.iter().enumerate() {
        cancel::check()?;
        // Alternate the entry node, so both b and c claim sprites they never ran.
        let via = NODES[1 + i % (NODES.len() - 1)];
        let r = first_exec(c, opts, name, via, sums).await;
        record_wake(res, true, r);
    }
    Ok(())
}

async fn forwarding(c: &Cluster, opts: &ClusterBenchOptions, res: &mut ClusterBenchResults) -> Result<()> {
    let name = "fwd";
    let b = c.api("b")?;
    create(b, name).await?;
    b.exec(name, &["true"]).await?;
    let owner = sprite_node(b, name).await?;
    // a is drained: forward through b or c, whichever does not own the sprite.
    let via = ["b", "c"].into_iter().find(|n| *n != owner).context("b and c")?;
    res.fwd_owner = owner.clone();
    res.fwd_via = via.to_string();
    let (direct, forwarded) = (c.api(&owner)?, c.api(via)?);
    for _ in 0..5 {
        direct.exec(name, &["true"]).await?;
        forwarded.exec(name, &["true"]).await?;
    }
    for _ in 0..opts.exec_samples.max(1) {
        cancel::check()?;
        for (api, out) in [
            (direct, &mut res.exec_owner),
            (forwarded, &mut res.exec_forwarded),
        ] {
            let t = Instant::now();
            match api.exec(name, &["true"]).await {
                Ok(_) => out.push(t.elapsed()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "exec true");
                    res.exec_errors += 1;
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

/// The nearest-rank percentile `p` (0–100) of `samples`: always an observed value.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let r = (p / 100.0 * s.len() as f64).ceil() as usize;
    Some(s[r.clamp(1, s.len()) - 1])
}

fn ms_opt(d: Option<Duration>) -> String {
    d.map_or("—".into(), fmt_ms)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

fn placement(run: &CreateRun) -> String {
    run.placement
        .iter()
        .map(|(n, k)| format!("{n}: {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn create_table(r: &ClusterBenchResults) -> TextTable {
    let mut t = TextTable::new(
        &[
            "Creates through node a",
            "n",
            "errors",
            "wall s",
            "creates/s",
            "POST p50 ms",
            "POST p90 ms",
            "+ first exec p50 ms",
            "+ first exec p90 ms",
            "placed on",
        ],
        1,
    );
    for run in [&r.one, &r.three] {
        t.push(vec![
            format!("{}-node cluster", run.nodes),
            run.total.len().to_string(),
            run.errors.to_string(),
            format!("{:.1}", run.wall.as_secs_f64()),
            run.per_second().map_or("—".into(), |x| format!("{x:.2}")),
            ms_opt(percentile(&run.post, 50.0)),
            ms_opt(percentile(&run.post, 90.0)),
            ms_opt(percentile(&run.total, 50.0)),
            ms_opt(percentile(&run.total, 90.0)),
            match &run.first_error {
                Some(e) => format!("{}; first error: {e}", placement(run)),
                None => placement(run),
            },
        ]);
    }
    let q = |run: &CreateRun, v: fn(&CreateRun) -> &Vec<Duration>, p| secs(percentile(v(run), p));
    t.push(vec![
        "3-node / 1-node".into(),
        String::new(),
        String::new(),
        String::new(),
        ratio(r.three.per_second(), r.one.per_second()),
        ratio(q(&r.three, |x| &x.post, 50.0), q(&r.one, |x| &x.post, 50.0)),
        ratio(q(&r.three, |x| &x.post, 90.0), q(&r.one, |x| &x.post, 90.0)),
        ratio(q(&r.three, |x| &x.total, 50.0), q(&r.one, |x| &x.total, 50.0)),
        ratio(q(&r.three, |x| &x.total, 90.0), q(&r.one, |x| &x.total, 90.0)),
        String::new(),
    ]);
    t
}

fn durations(s: &[WakeSample]) -> Vec<Duration> {
    s.iter().map(|s| s.took).collect()
}

fn every(s: &[WakeSample]) -> String {
    s.iter()
        .map(|s| format!("{} via {}→{}: {}", s.sprite, s.via, s.ran_on, fmt_ms(s.took)))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn wake_table(r: &ClusterBenchResults, opts: &ClusterBenchOptions) -> TextTable {
    let mut t = TextTable::new(
        &[
            "First exec after cold (reads every byte)",
            "n",
            "p50 ms",
            "p90 ms",
            "every sample (sprite via node→ran on)",
        ],
        1,
    );
    let (same, moved) = (durations(&r.wake_same), durations(&r.wake_moved));
    t.push(vec![
        "same node (a): wake, local chunk cache warm".into(),
        same.len().to_string(),
        ms_opt(percentile(&same, 50.0)),
        ms_opt(percentile(&same, 90.0)),
        every(&r.wake_same),
    ]);
    t.push(vec![
        "another node after draining a: claim + lazy fetch from S3".into(),
        moved.len().to_string(),
        ms_opt(percentile(&moved, 50.0)),
        ms_opt(percentile(&moved, 90.0)),
        every(&r.wake_moved),
    ]);
    t.push(vec![
        "other node / same node".into(),
        String::new(),
        ratio(secs(percentile(&moved, 50.0)), secs(percentile(&same, 50.0))),
        ratio(secs(percentile(&moved, 90.0)), secs(percentile(&same, 90.0))),
        format!(
            "{} MiB per sprite; drain of a (until listed as drained) took {} ms; errors: {}{}",
            opts.wake_bytes() >> 20,
            ms_opt(r.drain),
            r.wake_errors,
            r.wake_first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        ),
    ]);
    t
}

pub fn forward_table(r: &ClusterBenchResults) -> TextTable {
    let mut t = TextTable::new(&["Exec `true` round trip", "n", "p50 ms", "p90 ms"], 1);
    let (o, f) = (&r.exec_owner, &r.exec_forwarded);
    t.push(vec![
        format!("through the owner ({})", r.fwd_owner),
        o.len().to_string(),
        ms_opt(percentile(o, 50.0)),
        ms_opt(percentile(o, 90.0)),
    ]);
    t.push(vec![
        format!("through {} (forwarded to {})", r.fwd_via, r.fwd_owner),
        f.len().to_string(),
        ms_opt(percentile(f, 50.0)),
        ms_opt(percentile(f, 90.0)),
    ]);
    let diff = |p| match (percentile(f, p), percentile(o, p)) {
        (Some(f), Some(o)) => format!("{:+.2}", (f.as_secs_f64() - o.as_secs_f64()) * 1e3),
        _ => "—".into(),
    };
    t.push(vec![
        format!("forwarding overhead, ms (errors: {})", r.exec_errors),
        String::new(),
        diff(50.0),
        diff(90.0),
    ]);
    t
}

pub fn summary_table(r: &ClusterBenchResults) -> TextTable {
    let mut t = TextTable::new(&["Summary", "baseline", "cluster", "ratio / difference"], 1);
    t.push(vec![
        "creates/s (POST + first exec), 1 node vs 3 nodes".into(),
        r.one.per_second().map_or("—".into(), |x| format!("{x:.2}")),
        r.three.per_second().map_or("—".into(), |x| format!("{x:.2}")),
        ratio(r.three.per_second(), r.one.per_second()),
    ]);
    let (same, moved) = (durations(&r.wake_same), durations(&r.wake_moved));
    let (s50, m50) = (percentile(&same, 50.0), percentile(&moved, 50.0));
    t.push(vec![
        "first exec after cold, p50 ms: same node vs another node after drain".into(),
        ms_opt(s50),
        ms_opt(m50),
        ratio(secs(m50), secs(s50)),
    ]);
    let (o50, f50) = (
        percentile(&r.exec_owner, 50.0),
        percentile(&r.exec_forwarded, 50.0),
    );
    t.push(vec![
        "exec `true` p50 ms: through the owner vs forwarded".into(),
        ms_opt(o50),
        ms_opt(f50),
        match (o50, f50) {
            (Some(o), Some(f)) => format!("{:+.2} ms", (f.as_secs_f64() - o.as_secs_f64()) * 1e3),
            _ => "—".into(),
        },
    ]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn percentiles_are_observed_values() {
        let s: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(percentile(&s, 50.0), Some(d(5)));
        assert_eq!(percentile(&s, 90.0), Some(d(9)));
        assert_eq!(percentile(&[d(3), d(1)], 90.0), Some(d(3)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn wake_data_size() {
        let mut o = ClusterBenchOptions::new("/tmp/x".into(), "/bin/den".into(), true);
        assert_eq!(o.wake_bytes(), 32 << 20);
        o.wake_mib = 5;
        assert_eq!(o.wake_bytes(), 8 << 20);
        assert!(data_script(&o).contains("$(seq 2)"));
    }

    #[test]
    fn throughput() {
        let run = CreateRun {
            total: vec![d(1); 10],
            wall: Duration::from_secs(5),
            ..Default::default()
        };
        assert_eq!(run.per_second(), Some(2.0));
        assert_eq!(CreateRun::default().per_second(), None);
    }
}
