//! The official Python SDK (`sprites-py`, in /opt/den-venv) against den's
//! services and filesystem endpoints, changing only its base URL.

use anyhow::{Context, Result, ensure};

const SCRIPT: &str = r#"
import sys
from sprites import SpritesClient
from sprites.exceptions import FileNotFoundError_

url, token, name = sys.argv[1:4]
sp = SpritesClient(token, base_url=url).sprite(name)

fs = sp.filesystem("/home/sprite")
d = fs / "py"
f = d / "hello.txt"
f.write_text("hi from python")
assert f.read_text() == "hi from python"
st = f.stat()
assert st.size == 14 and not st.is_dir, st
f.chmod(0o700)
assert f.stat().mode == "0700", f.stat()
g = f.copy_to("copy.txt")
assert g.read_bytes() == b"hi from python"
h = g.rename(d / "moved.txt")
assert not g.exists() and h.exists()
assert sorted(d.listdir()) == ["hello.txt", "moved.txt"], d.listdir()
# The SDK's stat() takes a listing's first entry, so an empty directory
# can't be stat'ed; its parent's listing shows it.
(d / "sub" / "deeper").mkdir(parents=True)
assert "sub" in d.listdir() and (d / "sub").listdir() == ["deeper"], d.listdir()
try:
    (fs / "nope.txt").read_text()
    raise SystemExit("read of a missing file succeeded")
except FileNotFoundError_:
    pass
d.rmtree()
assert not d.exists()

evs = list(sp.create_service("pysvc", "sh", args=["-c", "echo py-up; exec sleep 1000"], duration=1.0,
                             env={"A": "1"}))
assert evs[0].type == "started" and evs[-1].type == "complete", evs
assert any(e.type == "stdout" and e.data == "py-up" for e in evs), evs
assert evs[-1].log_files["combined"] == "/.sprite/logs/services/pysvc.log", evs[-1]
svc = sp.get_service("pysvc")
assert svc.state.status == "running" and svc.state.pid and svc.env == {"A": "1"}, svc
assert [s.name for s in sp.list_services()] == ["pysvc"]
sp.signal_service("pysvc", "TERM")
evs = list(sp.stop_service("pysvc", timeout=10.0))
assert any(e.type == "stopped" for e in evs), evs
assert sp.get_service("pysvc").state.status == "stopped"
evs = list(sp.start_service("pysvc", duration=1.0))
assert any(e.type == "started" for e in evs), evs
sp.delete_service("pysvc")
assert sp.list_services() == []
print("python sdk ok")
"#;

fn python() -> &'static str {
    if std::path::Path::new("/opt/den-venv/bin/python3").exists() {
        "/opt/den-venv/bin/python3"
    } else {
        "python3"
    }
}

pub async fn python_sdk(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    s.create("py").await?;
    let (url, token) = (s.url.clone(), s.token.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .args(["-c", SCRIPT, &url, &token, "py"])
            .output()
    })
    .await?
    .context("running python")?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(
        out.status.success() && stdout.contains("python sdk ok"),
        "python SDK script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    s.stop().await;
    Ok(())
}
