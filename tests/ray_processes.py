"""Stop one Ray cluster that a test started, and nothing else: `ray stop` would also end
every other Ray on the machine (a user's sweep, another test's cluster)."""

from __future__ import annotations

import psutil


def cluster_processes(gcs_port: int) -> list[psutil.Process]:
    """Every process of the cluster whose GCS listens on `gcs_port`, and their children."""
    needles = (f"={gcs_port}", f":{gcs_port}")  # --gcs_server_port=P, --gcs-address=host:P
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if any(n in arg for arg in proc.info["cmdline"] or () for n in needles):
            found[proc.pid] = proc
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def stop_cluster(gcs_port: int, timeout: float = 15) -> None:
    procs = [p for p in cluster_processes(gcs_port) if p.pid != psutil.Process().pid]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
