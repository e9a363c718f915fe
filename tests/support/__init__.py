"""Plain helper modules for the tests of every tier (no fixtures here: those live in the
conftest.py files, see docs/architecture.md, "Where to put a new test").

- cluster: the vendors' keys (KEYS), start_cluster() for module-scoped clusters, and the
  helpers that drive one (add_vendor, final_state).
- images: JPEG bytes of an array, and the sample photos.
- tinymodel: the tiny ONNX model the tests build (bench/ uses it too).
- pngs: PNG files built chunk by chunk (bit depths Pillow cannot write, bombs).
- tls: a CA and a server certificate for 127.0.0.1.
- settings: the CUTOUT_ variables the services read; the gateway's default settings.
- waiting: until(), a wait on a condition instead of a fixed sleep.
- node_link: jobs sent straight to one inference node, as the scheduler sends them.
- webhook_receiver: an HTTPS receiver on loopback that scripts its answers.
- cloudinary_standin: a local Cloudinary Upload API for the real SDK.
- mariadb: the shared MariaDB (SHARED, rows) and private mariadbd servers.
- npm: npm in the TypeScript folders.
- k8s_env: the Kubernetes manifests as rendered (deploy/images/smoke.py uses it too).
- lockfile: requirements/*.lock read and compared.
- tiers: what a tier may start, enforced by tests/unit and tests/store.
"""
