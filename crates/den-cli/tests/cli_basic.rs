//! The client commands of `den` against a real `den server` started by the
//! test (a subprocess of the same binary, busybox image, its own network
//! sandbox from den_testkit::net). Run as root.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use den_testkit::net::TestNet;
use serde_json::Value;

const DEN: &str = env!("CARGO_BIN_EXE_den");
/// First start prepares the image; later ones are quick.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A `den server` subprocess; SIGTERM and wait on drop, so a failed test
/// still tears down its sprites, mounts and firewall table.
struct Server {
    child: Child,
    url: String,
    token: String,
    dir: tempfile::TempDir,
    _net: TestNet,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    /// Started with more `den server` flags (`--tls-cert` makes it https).
    fn start_with(extra: &[&std::ffi::OsStr]) -> Server {
        den_testkit::require_root();
        let dir = tempfile::Builder::new()
            .prefix("den-cli-test-")
            .tempdir()
            .unwrap();
        // Sprite processes run as other users and must reach their run dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let net = TestNet::new().expect("network sandbox");
        let n = &net.config;
        let cfg = format!(
            "run_dir = {:?}\nimages_dir = {:?}\nsubnet = {:?}\nnet_table = {:?}\nnet_ifprefix = {:?}\nnet_netns_prefix = {:?}\n\
             uplinks = {:?}\nblocked = {:?}\nupstream_dns = {:?}\nwarm_after = \"1h\"\ncold_after = \"2h\"\n",
            dir.path().join("run"),
            dir.path().join("images"),
            n.subnet.to_string(),
            n.table,
            n.ifprefix,
            n.netns_prefix,
            n.uplinks,
            n.blocked.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            n.upstream_dns.to_string(),
        );
        let cfg_path = dir.path().join("server.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let data = dir.path().join("data");
        let mut child = Command::new(DEN)
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--image",
                "busybox",
                "--data-dir",
            ])
            .arg(&data)
            .arg("--config")
            .arg(&cfg_path)
            .args(extra)
            .env_remove("DEN_CONFIG")
            // Info from the server module: what a signal did.
            .env("DEN_LOG", "warn,den_server::server=info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
            token: String::new(),
            dir,
            _net: net,
        };
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) => l,
            Err(e) => panic!("den server did not get ready ({e}); log:\n{}", server.log()),
        };
        let ready: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ready["ready"], true, "{line}");
        assert!(
            std::fs::read_dir(server.dir.path().join("images")).is_ok_and(|mut d| d.next().is_some()),
            "the base image was not built in the configured images_dir"
        );
        let scheme = if extra.iter().any(|a| *a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        server.url = format!("{scheme}://{}", ready["listen"].as_str().unwrap());
        server.token = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A user of the CLI: own HOME (so its own config file) and working directory,
/// and none of the caller's DEN_* settings.
struct User {
    home: tempfile::TempDir,
    cwd: PathBuf,
}

impl User {
    fn new() -> User {
        let home = tempfile::tempdir().unwrap();
        let cwd = home.path().join("work");
        std::fs::create_dir_all(&cwd).unwrap();
        User { home, cwd }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DEN);
        c.args(args)
            .current_dir(&self.cwd)
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DEN_API_URL")
            .env_remove("DEN_TOKEN")
            .env_remove("DEN_CA_CERT")
            .env_remove("DEN_LOG")
            .stdin(Stdio::null());
        c
    }

    fn config_file(&self) -> PathBuf {
        self.home.path().join(".config/den/config.toml")
    }
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

/// Run, insist on success, return stdout.
fn ok(c: Command) -> String {
    let dbg = format!("{c:?}");
    let o = run(c);
    assert!(
        o.status.success(),
        "{dbg} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Run, insist on failure, return stderr.
fn fails(c: Command) -> String {
    let dbg = format!("{c:?}");
    let o = run(c);
    assert!(
        !o.status.success(),
        "{dbg} should have failed; stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "{dbg}");
    String::from_utf8(o.stderr).unwrap()
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Run with stdin on a fresh pseudo-terminal that already holds `input`,
/// as if a person had typed it at the prompt.
fn run_on_tty(mut c: Command, input: &str) -> Output {
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut master = std::fs::File::from(pty.master);
    master.write_all(input.as_bytes()).unwrap();
    c.stdin(Stdio::from(pty.slave));
    c.output().unwrap()
}

/// An address nothing listens on (bound a moment ago by us, then closed).
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn completions_produce_output() {
    let u = User::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(u.cmd(&["completions", shell]));
        assert!(out.contains("den"), "{shell}");
        // The client commands and the existing ones are both completed.
        for sub in ["checkpoint", "destroy", "volume", "server"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    // Usage errors exit 2, as clap does everywhere.
    assert_eq!(run(u.cmd(&["completions", "tcsh"])).status.code(), Some(2));
}

#[test]
fn unreachable_server_says_so() {
    let u = User::new();
    let url = dead_url();
    let err = fails(u.cmd(&["ls", "--api-url", &url, "--token", "x"]));
    assert_eq!(
        err,
        format!("error: cannot reach den at {url} — is `den server` running?\n")
    );
    let err = fails(u.cmd(&["ls"]));
    assert_eq!(
        err,
        "error: no token — run `den login` (or pass --token, or set DEN_TOKEN)\n"
    );
}

#[test]
fn login_and_config_precedence() {
    let s = Server::start();
    let u = User::new();
    let dead = dead_url();

    // A wrong token is refused and nothing is saved.
    let err = fails(u.cmd(&["login", &s.url, "--token", "den_wrong"]));
    assert_eq!(err, "error: the server rejected the token — run `den login`\n");
    assert!(!u.config_file().exists());

    // The token can come from stdin (not a terminal: no prompt, no echo games).
    let mut c = u.cmd(&["login", &s.url]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{}", s.token).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = std::fs::metadata(u.config_file()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let saved: toml::Table = toml::from_str(&std::fs::read_to_string(u.config_file()).unwrap()).unwrap();
    assert_eq!(saved["api_url"].as_str(), Some(s.url.as_str()));
    assert_eq!(saved["token"].as_str(), Some(s.token.as_str()));

    // File only: works.
    ok(u.cmd(&["ls"]));

    // On a terminal it prompts on stderr and reads the typed token; the token is never printed.
    let o = run_on_tty(u.cmd(&["login"]), &format!("{}\n", s.token));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with(&format!("Token for {}", s.url)));
    assert!(!String::from_utf8_lossy(&o.stderr).contains(&s.token));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&format!("logged in to {}", s.url)));

    // Token: env beats file, flag beats env.
    let mut c = u.cmd(&["ls"]);
    c.env("DEN_TOKEN", "den_wrong");
    assert_eq!(
        fails(c),
        "error: the server rejected the token — run `den login`\n"
    );
    let mut c = u.cmd(&["ls", "--token", &s.token]);
    c.env("DEN_TOKEN", "den_wrong");
    ok(c);
    // ... and a flag beats a good file too.
    assert_eq!(
        fails(u.cmd(&["ls", "--token", "den_wrong"])),
        "error: the server rejected the token — run `den login`\n"
    );

    // URL: env beats file, flag beats env.
    let mut c = u.cmd(&["ls"]);
    c.env("DEN_API_URL", &dead);
    assert_eq!(
        fails(c),
        format!("error: cannot reach den at {dead} — is `den server` running?\n")
    );
    let mut c = u.cmd(&["ls", "--api-url", &s.url]);
    c.env("DEN_API_URL", &dead);
    ok(c);
    let other = dead_url();
    let mut c = u.cmd(&["ls", "--api-url", &other]);
    c.env("DEN_API_URL", &s.url);
    assert_eq!(
        fails(c),
        format!("error: cannot reach den at {other} — is `den server` running?\n")
    );

    // Tokens: create one, use it, revoke it, and it stops working.
    let minted = json(&ok(u.cmd(&["token", "create", "ci", "--json"])));
    let secret = minted["token"].as_str().unwrap().to_string();
    let id = minted["id"].as_str().unwrap().to_string();
    ok(u.cmd(&["ls", "--token", &secret]));
    let listed = json(&ok(u.cmd(&["token", "ls", "--json"])));
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str() && t["name"] == "ci")
    );
    assert!(ok(u.cmd(&["token", "ls"])).contains("ci"));
    ok(u.cmd(&["token", "revoke", &id]));
    assert_eq!(
        fails(u.cmd(&["ls", "--token", &secret])),
        "error: the server rejected the token — run `den login`\n"
    );
    // Logout forgets the token but keeps the URL.
    assert!(ok(u.cmd(&["logout"])).starts_with("removed the token"));
    assert_eq!(
        fails(u.cmd(&["ls"])),
        "error: no token — run `den login` (or pass --token, or set DEN_TOKEN)\n"
    );
    ok(u.cmd(&["ls", "--token", &s.token]));
    assert_eq!(ok(u.cmd(&["logout"])), "not logged in\n");
    let plain = ok(u.cmd(&["token", "create", "--token", &s.token]));
    assert!(plain.trim().starts_with("den_"), "{plain}");
}

#[test]
fn organisations_and_scoped_tokens() {
    let s = Server::start();
    let admin = logged_in(&s);
    let out = ok(admin.cmd(&[
        "org",
        "create",
        "acme",
        "--name",
        "Acme Inc",
        "--max-sprites",
        "5",
    ]));
    assert!(
        out.starts_with("acme (Acme Inc)") && out.contains("max_sprites: 5"),
        "{out}"
    );
    assert!(
        fails(admin.cmd(&["org", "create", "Bad-Slug"])).contains("1-32 characters of a-z and 0-9"),
        "a bad slug is refused clearly"
    );
    let minted = json(&ok(admin.cmd(&[
        "token",
        "create",
        "agent",
        "--org",
        "acme",
        "--role",
        "member",
        "--sprites",
        "web",
        "--expires-in",
        "1h",
        "--json",
    ])));
    assert_eq!(minted["org"], "acme");
    assert_eq!(minted["role"], "member");
    assert_eq!(minted["sprites"], serde_json::json!(["web"]));
    assert!(minted["expires_at"].is_string());
    let agent = minted["token"].as_str().unwrap().to_string();

    // The agent's token makes and reaches its one sprite, in its organisation.
    let u = User::new();
    ok(u.cmd(&["login", &s.url, "--token", &agent]));
    let web = json(&ok(u.cmd(&["create", "web", "--skip-console", "--json"])));
    assert_eq!(web["organization"], "acme");
    assert!(
        web["url"].as_str().unwrap().starts_with("http://web-acme."),
        "{web}"
    );
    let e = fails(u.cmd(&["create", "other", "--skip-console"]));
    assert!(e.contains("reaches only the sprites it lists"), "{e}");
    let shown = ok(u.cmd(&["org", "show"]));
    assert!(
        shown.starts_with("acme (Acme Inc)") && shown.contains("sprites: 1"),
        "{shown}"
    );
    // A member manages no tokens and no organisations.
    assert!(fails(u.cmd(&["token", "ls"])).contains("admin"));
    assert!(fails(u.cmd(&["org", "ls"])).contains("administrator"));
    // The server's own organisation does not see acme's sprite.
    let mine = json(&ok(admin.cmd(&["ls", "--json"])));
    assert!(names(&mine).is_empty(), "{mine}");
    let orgs = ok(admin.cmd(&["org", "ls"]));
    assert!(orgs.contains("acme") && orgs.contains("den"), "{orgs}");
    // The audit log says who made the sprite.
    let audit = ok(admin.cmd(&["org", "audit", "acme"]));
    assert!(
        audit.contains("POST /v1/sprites") && audit.contains("agent"),
        "{audit}"
    );
    // An organisation with sprites stays; limits can be changed.
    assert!(fails(admin.cmd(&["org", "rm", "acme"])).contains("still has 1 sprites"));
    let set = ok(admin.cmd(&["org", "set", "acme", "--max-awake", "2"]));
    assert!(
        set.contains("max_awake: 2") && !set.contains("max_sprites"),
        "{set}"
    );
}

/// Logged-in user of `s`.
fn logged_in(s: &Server) -> User {
    let u = User::new();
    ok(u.cmd(&["login", &s.url, "--token", &s.token]));
    u
}

#[test]
fn sprites_lifecycle() {
    let s = Server::start();
    let u = logged_in(&s);

    let out = ok(u.cmd(&["create", "alpha", "--label", "team-a", "--skip-console"]));
    assert!(out.starts_with("created sprite alpha in "), "{out}");
    assert!(out.contains("url: http://alpha."), "{out}");
    // --runtime picks the sprite's engine (den's config.runtime); the
    // server's default otherwise.
    let beta = json(&ok(u.cmd(&[
        "create",
        "beta",
        "--runtime",
        "gvisor",
        "--skip-console",
        "--json",
    ])));
    assert_eq!(beta["name"], "beta");
    assert_eq!(beta["config"]["runtime"], "gvisor", "{beta}");
    let o = run(u.cmd(&["create", "kvm", "--runtime", "kvm", "--skip-console"]));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && e.contains("invalid value 'kvm'"),
        "{e}"
    );
    // No name: a random friendly one.
    // Without --skip-console but not on a terminal: no console, a hint instead.
    let o = run(u.cmd(&["create"]));
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("open a shell in it with: den console -s "));
    let rnd_name = out
        .strip_prefix("created sprite ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert_eq!(rnd_name.split('-').count(), 3, "{rnd_name}");

    let all = json(&ok(u.cmd(&["ls", "--json"])));
    let mut want = vec!["alpha".to_string(), "beta".to_string(), rnd_name.clone()];
    want.sort();
    assert_eq!(names(&all), want);
    assert_eq!(
        names(&json(&ok(u.cmd(&["ls", "--prefix", "al", "--json"])))),
        ["alpha"]
    );
    let table = ok(u.cmd(&["ls"]));
    let header = table.lines().next().unwrap();
    for col in ["NAME", "STATUS", "URL", "LAST ACTIVE"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table.lines().any(|l| l.contains("alpha") && l.contains("cold")),
        "{table}"
    );

    // --watch redraws until Ctrl+C; with --json, one array per line.
    let mut c = u.cmd(&["ls", "--watch", "--json", "--prefix", "al"]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        assert_eq!(names(&json(&lines.next().unwrap().unwrap())), ["alpha"]);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success(), "Ctrl+C ends --watch cleanly");

    let info = json(&ok(u.cmd(&["info", "alpha", "--json"])));
    assert_eq!(info["name"], "alpha");
    assert_eq!(info["config"]["runtime"], "native", "{info}");
    assert_eq!(info["labels"], serde_json::json!(["team-a"]));
    let text = ok(u.cmd(&["info", "-s", "alpha"]));
    assert!(
        text.contains("name:") && text.contains("alpha") && text.contains("team-a"),
        "{text}"
    );

    // Unknown sprite, wherever it is named.
    let nf = "error: sprite 'nope' not found — run `den ls`\n";
    assert_eq!(fails(u.cmd(&["info", "nope"])), nf);
    assert_eq!(fails(u.cmd(&["-s", "nope", "checkpoint", "ls"])), nf);
    assert_eq!(fails(u.cmd(&["destroy", "nope", "--force"])), nf);
    assert_eq!(fails(u.cmd(&["use", "nope"])), nf);

    // No sprite chosen yet.
    assert!(fails(u.cmd(&["info"])).contains("den use NAME"));
    // `den use` writes .den; commands in this directory and below use it.
    ok(u.cmd(&["use", "beta"]));
    assert_eq!(
        std::fs::read_to_string(u.cwd.join(".den")).unwrap().trim(),
        "sprite = \"beta\""
    );
    assert_eq!(json(&ok(u.cmd(&["info", "--json"])))["name"], "beta");
    let sub = u.cwd.join("deeper/still");
    std::fs::create_dir_all(&sub).unwrap();
    let mut c = u.cmd(&["info", "--json"]);
    c.current_dir(&sub);
    assert_eq!(json(&ok(c))["name"], "beta");
    // -s beats .den.
    assert_eq!(
        json(&ok(u.cmd(&["info", "--json", "-s", "alpha"])))["name"],
        "alpha"
    );

    // URL auth.
    let url = json(&ok(u.cmd(&["url", "--json"])));
    assert_eq!(url["auth"], "sprite");
    assert!(url["url"].as_str().unwrap().starts_with("http://beta."));
    ok(u.cmd(&["url", "--auth", "public"]));
    assert_eq!(
        json(&ok(u.cmd(&["info", "--json"])))["url_settings"]["auth"],
        "public"
    );

    // Policy.
    assert_eq!(
        json(&ok(u.cmd(&["policy", "get"]))),
        serde_json::json!({"rules": []})
    );
    ok(u.cmd(&["policy", "allow", "github.com"]));
    ok(u.cmd(&["policy", "deny", "*"]));
    ok(u.cmd(&["policy", "deny", "github.com"]));
    assert_eq!(
        json(&ok(u.cmd(&["policy", "get", "--json"]))),
        serde_json::json!({"rules": [{"domain": "github.com", "action": "deny"}, {"domain": "*", "action": "deny"}]})
    );
    let pfile = u.cwd.join("policy.json");
    std::fs::write(&pfile, r#"{"rules":[{"include":"defaults"}]}"#).unwrap();
    ok(u.cmd(&["policy", "set", pfile.to_str().unwrap()]));
    assert_eq!(
        json(&ok(u.cmd(&["policy", "get"]))),
        serde_json::json!({"rules": [{"include": "defaults"}]})
    );
    std::fs::write(&pfile, r#"{"rules":[{"domain":"x.com"}]}"#).unwrap();
    assert!(fails(u.cmd(&["policy", "set", pfile.to_str().unwrap()])).contains("invalid policy config"));

    // Destroy: refuses without a terminal unless --force.
    let err = fails(u.cmd(&["destroy", "alpha"]));
    assert_eq!(
        err,
        "error: refusing to destroy 'alpha' without confirmation (stdin is not a terminal) — pass --force\n"
    );
    assert_eq!(json(&ok(u.cmd(&["info", "alpha", "--json"])))["name"], "alpha");
    // On a terminal it asks; anything but yes keeps the sprite.
    let o = run_on_tty(u.cmd(&["destroy", "alpha"]), "n\n");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Destroy sprite 'alpha'") && err.ends_with("error: not destroyed\n"),
        "{err}"
    );
    assert_eq!(json(&ok(u.cmd(&["info", "alpha", "--json"])))["name"], "alpha");
    let o = run_on_tty(u.cmd(&["destroy", "beta"]), "y\n");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "destroyed sprite beta\n");
    assert_eq!(
        fails(u.cmd(&["info", "beta"])),
        "error: sprite 'beta' not found — run `den ls`\n"
    );
    assert_eq!(
        ok(u.cmd(&["destroy", "alpha", "--force"])),
        "destroyed sprite alpha\n"
    );
    assert_eq!(
        fails(u.cmd(&["info", "alpha"])),
        "error: sprite 'alpha' not found — run `den ls`\n"
    );
    ok(u.cmd(&["use", "--unset"]));
    assert!(!u.cwd.join(".den").exists());
    assert_eq!(names(&json(&ok(u.cmd(&["ls", "--json"])))), [rnd_name]);
}

#[test]
fn checkpoint_restore_fork() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "src", "--skip-console"]));
    ok(u.cmd(&["use", "src"]));

    let out = ok(u.cmd(&["checkpoint", "create", "--comment", "first"]));
    assert!(out.starts_with("checkpoint v"), "{out}");
    assert!(out.contains(" of src created in "), "{out}");
    let first = out.split_whitespace().nth(1).unwrap().to_string();
    let second = json(&ok(u.cmd(&["checkpoint", "create", "--json"])));
    let second_id = second["id"].as_str().unwrap().to_string();
    assert_ne!(first, second_id);
    assert!(second["elapsed_ms"].is_u64());

    let list = json(&ok(u.cmd(&["checkpoint", "ls", "--json"])));
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&first.as_str()) && ids.contains(&second_id.as_str()),
        "{list}"
    );
    assert!(ok(u.cmd(&["checkpoint", "ls"])).contains("first"));
    let info = json(&ok(u.cmd(&["checkpoint", "info", &first, "--json"])));
    assert_eq!(info["id"], first.as_str());
    assert_eq!(info["comment"], "first");
    assert!(fails(u.cmd(&["checkpoint", "info", "v999"])).contains("not found"));

    let o = run(u.cmd(&["restore", &first]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.starts_with(&format!("restored src to {first} in ")), "{out}");
    // The server's NDJSON progress, line by line.
    assert_eq!(
        String::from_utf8(o.stderr).unwrap(),
        format!("Restoring from checkpoint {first}...\nRestore from {first} complete\n")
    );
    assert!(fails(u.cmd(&["restore", "v999"])).contains("v999"));

    let forked = json(&ok(u.cmd(&["fork", &format!("src@{first}"), "child", "--json"])));
    assert_eq!(forked["name"], "child");
    let out = ok(u.cmd(&["fork", "src", "live-copy"]));
    assert!(out.starts_with("forked src into live-copy in "), "{out}");
    let all = names(&json(&ok(u.cmd(&["ls", "--json"]))));
    assert_eq!(all, ["child", "live-copy", "src"]);
    assert_eq!(
        fails(u.cmd(&["fork", "ghost", "x"])),
        "error: sprite 'ghost' not found — run `den ls`\n"
    );

    // `den api` reaches any endpoint, streams NDJSON, and explains errors the same way.
    let listed = json(&ok(u.cmd(&["api", "/v1/sprites?prefix=chi"])));
    assert_eq!(names(&listed["sprites"]), ["child"]);
    let ndjson = ok(u.cmd(&[
        "api",
        "-X",
        "post",
        "/v1/sprites/child/checkpoint",
        "-d",
        r#"{"comment":"raw"}"#,
    ]));
    let last = json(ndjson.lines().last().unwrap());
    assert_eq!(last["type"], "complete", "{ndjson}");
    assert_eq!(
        json(&ok(u.cmd(&["checkpoint", "ls", "--json", "-s", "child"])))[0]["comment"],
        "raw"
    );
    assert_eq!(
        fails(u.cmd(&["api", "/v1/sprites/ghost"])),
        "error: sprite not found: ghost\n"
    );
    let mut c = u.cmd(&["api", "/v1/sprites"]);
    c.env("DEN_TOKEN", "den_wrong");
    assert_eq!(
        fails(c),
        "error: the server rejected the token — run `den login`\n"
    );

    ok(u.cmd(&["checkpoint", "rm", &second_id]));
    let list = json(&ok(u.cmd(&["checkpoint", "ls", "--json"])));
    assert!(
        !list
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == second_id.as_str()),
        "{list}"
    );
}

/// Run, return (exit code, stdout, stderr).
fn outcome(c: Command) -> (Option<i32>, String, String) {
    let o = run(c);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn exec_streams_and_exit_codes() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));

    // A pipeline: stdin goes through and EOF ends `cat`.
    let mut c = u.cmd(&["exec", "--", "cat"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");

    // Exit codes pass through, a signal death as 128+signal.
    assert_eq!(outcome(u.cmd(&["exec", "--", "sh", "-c", "exit 7"])).0, Some(7));
    assert_eq!(
        outcome(u.cmd(&["exec", "--", "sh", "-c", "kill -9 $$"])).0,
        Some(137)
    );

    // stdout and stderr stay apart.
    let (code, out, err) = outcome(u.cmd(&["exec", "--", "sh", "-c", "echo out; echo err >&2"]));
    assert_eq!((code, out.as_str(), err.as_str()), (Some(0), "out\n", "err\n"));

    // --env and --dir.
    let out = ok(u.cmd(&[
        "exec",
        "--env",
        "FOO=bar baz",
        "--dir",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$FOO\"; pwd",
    ]));
    assert_eq!(out, "bar baz\n/tmp\n");

    // --timeout ends the command and says so.
    let t0 = std::time::Instant::now();
    let (code, _, err) = outcome(u.cmd(&["exec", "--timeout", "1s", "--", "sleep", "30"]));
    assert!(code.is_some_and(|c| c != 0), "{code:?} {err}");
    assert!(err.contains("den:"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20));

    // 100 MiB of stdin streams through intact.
    let big = u.cwd.join("big.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..100 {
            for c in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let local = ok({
        let mut c = Command::new("sha256sum");
        c.arg(&big);
        c
    });
    let mut c = u.cmd(&["exec", "--", "sha256sum"]);
    c.stdin(std::fs::File::open(&big).unwrap());
    let remote = ok(c);
    assert_eq!(
        remote.split_whitespace().next(),
        local.split_whitespace().next(),
        "{remote} vs {local}"
    );

    // No command, or a bad flag value: usage and helpful errors.
    assert_eq!(run(u.cmd(&["exec"])).status.code(), Some(2));
    assert!(fails(u.cmd(&["exec", "--timeout", "soon", "--", "true"])).contains("not a duration"));
    assert_eq!(
        fails(u.cmd(&["exec", "-s", "nope", "--", "true"])),
        "error: sprite 'nope' not found — run `den ls`\n"
    );
}

/// A `den` on its own pseudo-terminal (its controlling terminal, so window
/// size changes reach it as SIGWINCH), with everything it prints collected.
struct Pty {
    master: std::fs::File,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    child: Child,
    /// Reads the master until the last slave descriptor closes.
    reader: std::thread::JoinHandle<()>,
}

impl Pty {
    fn spawn(mut c: Command) -> Pty {
        use std::os::unix::process::CommandExt;
        let ws = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).unwrap();
        let slave = std::fs::File::from(pty.slave);
        c.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        drop(c);
        let master = std::fs::File::from(pty.master);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut r, s2) = (master.try_clone().unwrap(), seen.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut r, &mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            seen,
            child,
            reader,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    /// Wait until the output contains `needle`; panic with all of it if not.
    fn expect(&self, needle: &str) {
        let r = den_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            self.text().contains(needle)
        });
        assert!(r.is_ok(), "never saw {needle:?}; output:\n{}", self.text());
    }

    fn resize(&self, cols: u16, rows: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize we own.
        assert_eq!(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
    }

    /// Wait for the exit (bounded) and return the code.
    fn wait(mut self) -> (Option<i32>, String) {
        let r = den_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        assert!(r.is_ok(), "den did not exit; output:\n{}", self.text());
        let code = self.child.wait().unwrap().code();
        // What it printed just before exiting may still be in the pty: read
        // to the end (the master reads EIO once the child's slave is closed).
        let drained = den_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(5), || {
            self.reader.is_finished()
        });
        assert!(drained.is_ok(), "something else holds den's terminal open");
        (
            code,
            String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned(),
        )
    }
}

#[test]
fn console_detach_attach_and_sessions() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));

    let mut p = Pty::spawn(u.cmd(&["console"]));
    p.send("echo $((6*7))\n");
    p.expect("42\r\n");
    // A new window size reaches the shell.
    p.resize(100, 30);
    p.send("stty size\n");
    p.expect("30 100");
    // Ctrl+\ detaches and says how to come back.
    p.send("\x1c");
    let (code, out) = p.wait();
    assert_eq!(code, Some(0), "{out}");
    let id = out
        .split("detached from session ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert!(out.contains(&format!("den sessions attach {id} -s box")), "{out}");

    let list = json(&ok(u.cmd(&["sessions", "ls", "--json"])));
    assert!(
        list.as_array().unwrap().iter().any(|s| s["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(s["id"].to_string())
            == id
            && s["tty"] == true),
        "{list}"
    );
    assert!(ok(u.cmd(&["sessions", "ls"])).contains(&id));

    // Attach replays what the session printed, then it is live again.
    let mut p = Pty::spawn(u.cmd(&["sessions", "attach", &id]));
    p.expect("30 100");
    p.send("echo again-$((1+1))\n");
    p.expect("again-2");
    p.send("exit 3\n");
    let (code, out) = p.wait();
    assert_eq!(code, Some(3), "{out}");

    // Kill: a detached console ends on a signal.
    let mut p = Pty::spawn(u.cmd(&["console"]));
    p.send("echo ready-$((2+2))\n");
    p.expect("ready-4");
    p.send("\x1c");
    let (_, out) = p.wait();
    let id2 = out
        .split("detached from session ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let o = run(u.cmd(&["sessions", "kill", &id2, "--signal", "KILL"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(&format!("session {id2} ended")));
    let list = ok(u.cmd(&["sessions", "ls", "--json"]));
    assert!(!list.contains(&format!("\"{id2}\"")), "{list}");
}

/// A relative path with its bytes and mode (`None` for a directory).
type TreeEntry = (String, Option<(Vec<u8>, u32)>);

/// Every file under `root` with its bytes and mode, and every directory, by relative path.
fn tree(root: &std::path::Path) -> Vec<TreeEntry> {
    fn go(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<TreeEntry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::metadata(&p).unwrap();
            if m.is_dir() {
                out.push((rel, None));
                go(root, &p, out);
            } else {
                out.push((
                    rel,
                    Some((std::fs::read(&p).unwrap(), m.permissions().mode() & 0o777)),
                ));
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn cp_round_trips_a_tree() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));

    let src = u.cwd.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(src.join("sub/b.txt"), "").unwrap();
    std::fs::write(src.join("sub/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(src.join("sub/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut big = vec![0u8; 5 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for c in big.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(src.join("sub/deeper/big.bin"), &big).unwrap();

    // Up: the destination does not exist, so it becomes the copy.
    let out = ok(u.cmd(&["cp", "src", ":/tmp/up"]));
    assert!(out.starts_with("copied 4 file(s)"), "{out}");
    let listed = ok(u.cmd(&["exec", "--", "sh", "-c", "cd /tmp/up && find . | sort"]));
    assert_eq!(
        listed,
        ".\n./a.txt\n./empty\n./sub\n./sub/b.txt\n./sub/deeper\n./sub/deeper/big.bin\n./sub/run.sh\n"
    );
    assert_eq!(ok(u.cmd(&["exec", "--", "/tmp/up/sub/run.sh"])), "hi\n");

    // Down, into an existing directory: it lands inside, under its own name.
    let back = u.cwd.join("back");
    std::fs::create_dir_all(&back).unwrap();
    ok(u.cmd(&["cp", "box:/tmp/up", "back"]));
    assert!(
        tree(&src) == tree(&back.join("up")),
        "the round trip changed the tree"
    );

    // Single files, both ways, with the NAME: form.
    ok(u.cmd(&["cp", "src/a.txt", "box:/tmp/up/sub/"]));
    assert_eq!(ok(u.cmd(&["exec", "--", "cat", "/tmp/up/sub/a.txt"])), "alpha\n");
    ok(u.cmd(&["cp", ":/tmp/up/sub/deeper/big.bin", "big-copy"]));
    assert!(std::fs::read(u.cwd.join("big-copy")).unwrap() == big);

    // Errors say what is wrong.
    assert!(fails(u.cmd(&["cp", "src", "back"])).contains("neither side is in a sprite"));
    assert!(fails(u.cmd(&["cp", ":/nope", "x"])).contains("does not exist"));
}

/// Wait (bounded) for a child to exit; kill it and fail if it does not.
fn wait_child(mut child: Child) -> std::process::ExitStatus {
    let r = den_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if r.is_err() {
        let _ = child.kill();
        panic!("den did not exit");
    }
    child.wait().unwrap()
}

#[test]
fn exec_forwards_ctrl_c_and_services() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));

    // Ctrl+C (SIGINT to den) reaches the command as INT.
    let mut c = u.cmd(&[
        "exec",
        "--",
        "sh",
        "-c",
        "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.1; done",
    ]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(lines.next().unwrap().unwrap(), "got-int");
    assert_eq!(wait_child(child).code(), Some(5));

    // Services.
    assert!(ok(u.cmd(&["services", "ls"])).starts_with("no services"));
    ok(u.cmd(&[
        "services",
        "create",
        "ticker",
        "--cmd",
        "sh",
        "--arg",
        "-c",
        "--arg",
        "while true; do echo tick; sleep 0.2; done",
    ]));
    let status = |u: &User| {
        let l = json(&ok(u.cmd(&["services", "ls", "--json"])));
        l[0]["state"]["status"].as_str().unwrap_or("").to_string()
    };
    let until = |want: &str| {
        let r = den_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            status(&u) == want
        });
        assert!(r.is_ok(), "service never {want}: {}", status(&u));
    };
    until("running");
    assert!(ok(u.cmd(&["services", "ls"])).contains("ticker"));
    let r = den_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        ok(u.cmd(&["services", "logs", "ticker"])).contains("tick")
    });
    assert!(r.is_ok(), "no log lines");
    // -f follows until Ctrl+C.
    let mut c = u.cmd(&["services", "logs", "ticker", "-f", "-n", "1"]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        assert!(lines.next().unwrap().unwrap().contains("tick"));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    wait_child(child);

    ok(u.cmd(&["services", "stop", "ticker"]));
    until("stopped");
    ok(u.cmd(&["services", "start", "ticker"]));
    until("running");
    ok(u.cmd(&["services", "rm", "ticker"]));
    assert_eq!(
        json(&ok(u.cmd(&["services", "ls", "--json"]))),
        serde_json::json!([])
    );
    assert!(fails(u.cmd(&["services", "start", "ghost"])).contains("ghost"));
}

#[test]
fn proxy_forwards_a_port() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));
    ok(u.cmd(&[
        "services",
        "create",
        "greeter",
        "--cmd",
        "sh",
        "--arg",
        "-c",
        "--arg",
        "while true; do echo hello-proxy | nc -l -p 8000; done",
    ]));
    let port = den_testkit::free_port().unwrap();
    let mut c = u.cmd(&["proxy", &format!("{port}:8000")]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        format!("forwarding 127.0.0.1:{port} -> box:8000")
    );
    // Until the listener in the sprite is up, tunnels close empty.
    let r = den_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = String::new();
        let _ = std::io::Read::read_to_string(&mut conn, &mut got);
        got.contains("hello-proxy")
    });
    assert!(r.is_ok(), "never got the greeting through the proxy");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(wait_child(child).success());
}

#[test]
fn exec_forward_follows_opened_ports() {
    let s = Server::start();
    let u = logged_in(&s);
    ok(u.cmd(&["create", "box", "--skip-console"]));
    ok(u.cmd(&["use", "box"]));
    let port = den_testkit::free_port().unwrap();
    let script = format!("echo fwd-hello | nc -l -p {port}; echo served");
    let mut c = u.cmd(&["exec", "--forward", "--", "sh", "-c", &script]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let want = format!("den: forwarding 127.0.0.1:{port} -> box:{port}");
    loop {
        let l = err
            .next()
            .expect("stderr ended before the port was forwarded")
            .unwrap();
        if l == want {
            break;
        }
    }
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = String::new();
    let _ = std::io::Read::read_to_string(&mut conn, &mut got);
    assert_eq!(got, "fwd-hello\n");
    assert!(wait_child(child).success());
}

/// A test CA and a server certificate from it for `localhost` and
/// `127.0.0.1`, written to `dir` as ca.crt, server.crt and server.key.
fn test_pki(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (dir.join("ca.crt"), dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Send SIGHUP to the server, wait until its log shows `handled` (the
/// signal reached den's handler), and check the server still runs and
/// answers.
fn hangup_and_check(s: &mut Server, u: &User, handled: &str) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !s.log().contains(handled) {
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "den server died of SIGHUP; log:\n{}",
            s.log()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no {handled:?} in the log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = u.cmd(&["ls", "--api-url", &s.url, "--token", &s.token]);
    let ca = s.dir.path().join("ca.crt");
    if ca.exists() {
        c.env("DEN_CA_CERT", ca);
    }
    ok(c);
    assert!(s.child.try_wait().unwrap().is_none(), "den server exited");
}

#[test]
fn https_server_with_a_private_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(pki.path());
    let mut s = Server::start_with(&[
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
    ]);
    std::fs::copy(&ca, s.dir.path().join("ca.crt")).unwrap();
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let u = User::new();
    let conn = ["--api-url", s.url.as_str(), "--token", s.token.as_str()];

    // Without the CA: the error says what is wrong and what to do.
    let err = fails(u.cmd(&[&["ls"], &conn[..]].concat()));
    assert!(
        err.contains("TLS with den at") && err.contains("DEN_CA_CERT"),
        "{err}"
    );

    // With DEN_CA_CERT: HTTP requests and the exec WebSocket (wss://).
    let with_env = |args: &[&str]| {
        // Connection flags first: after `--` they would be the command's.
        let mut c = u.cmd(&[&conn[..], args].concat());
        c.env("DEN_CA_CERT", &ca);
        c
    };
    ok(with_env(&["create", "tls1", "--skip-console"]));
    assert_eq!(
        ok(with_env(&["exec", "-s", "tls1", "--", "echo", "over tls"])),
        "over tls\n"
    );
    let list = json(&ok(with_env(&["ls", "--json"])));
    let port = s.url.rsplit(':').next().unwrap();
    let sprite = &list.as_array().unwrap()[0];
    assert_eq!(sprite["name"], "tls1");
    assert_eq!(sprite["url"], format!("https://tls1.localhost:{port}/"));
    // --ca-cert does the same.
    let mut c = u.cmd(
        &[
            &conn[..],
            &["exec", "-s", "tls1", "--ca-cert"],
            &[ca.to_str().unwrap()][..],
            &["--", "echo", "flag"],
        ]
        .concat(),
    );
    c.env_remove("DEN_CA_CERT");
    assert_eq!(ok(c), "flag\n");

    // `den login --ca-cert` saves the CA with the URL and token.
    let fresh = User::new();
    ok(fresh.cmd(&[
        "login",
        &s.url,
        "--token",
        &s.token,
        "--ca-cert",
        ca.to_str().unwrap(),
    ]));
    assert!(ok(fresh.cmd(&["ls"])).contains("tls1"));

    // SIGHUP reloads the certificate; the server stays up.
    hangup_and_check(&mut s, &u, "TLS certificate reloaded");
}

#[test]
fn sighup_does_not_stop_a_plain_server() {
    let mut s = Server::start();
    let u = User::new();
    hangup_and_check(&mut s, &u, "no TLS certificate to reload");
}
