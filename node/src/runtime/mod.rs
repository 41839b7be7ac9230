//! The wasm runtime: one wasmtime `Engine` per node (pooling allocator, epoch interruption),
//! compiled artifacts cached per digest on disk and in memory, and the two ways a container
//! runs: an HTTP service ([`HttpApp`], a fresh instance per request from an `InstancePre`)
//! or a command ([`CommandApp`], a wasi:cli component or preview 1 module run to exit).
//!
//! This module runs guests; it does not decide when (that is [`crate::pod`]) and does not
//! fetch bytes (that is [`crate::images`]).

mod command;
mod http;
mod outbound;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, StoreLimits,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub use command::{CommandApp, ExitStatus};
pub use http::{GuestFailure, HttpApp, HttpBody, text_response};
pub use outbound::{Outbound, OutboundPolicy, OutboundRelay, SendFuture};

use crate::logs::{GuestOutput, LogWriter};
use crate::metrics::Metrics;
use crate::oci::artifact::{WasmKind, wasm_kind};
use crate::settings::NodeSettings;

/// Why a guest could not be loaded or started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Invalid(String),
    #[error("compiling {digest}: {message}")]
    Compile { digest: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wasmtime: {0}")]
    Engine(String),
}

fn engine_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Engine(format!("{e:#}"))
}

/// Compiled code for one digest, shared by every container that runs it.
#[derive(Clone)]
pub enum Loaded {
    Component(Component),
    Module(Module),
}

/// Store data of component guests.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: StoreLimits,
    pub(crate) outbound: Outbound,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Store data of preview 1 module guests.
pub struct P1State {
    pub(crate) wasi: wasmtime_wasi::p1::WasiP1Ctx,
    pub(crate) limits: StoreLimits,
}

/// What a container gets from its pod spec.
#[derive(Clone)]
pub struct GuestContext {
    /// argv, including argv[0].
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Linear memory cap in bytes.
    pub memory_limit: u64,
    /// Where the guest's stdout and stderr go: the container log in the agent, the link
    /// to the agent in a sandbox.
    pub log: Arc<dyn GuestOutput>,
    /// Where the guest may send HTTP requests.
    pub outbound: Outbound,
    /// `namespace/pod/container`, for traces.
    pub name: String,
    /// Directories the guest is given (its volume mounts).
    pub preopens: Vec<Preopen>,
}

/// A directory given to a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// The directory in this process's file system.
    pub dir: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    pub read_only: bool,
}

impl GuestContext {
    /// The WASI context every instance of this container starts from: its argv, its
    /// environment, its preopened directories, and stdout/stderr into its log. Fails
    /// when a directory cannot be opened.
    pub(crate) fn wasi(&self) -> Result<wasmtime_wasi::WasiCtxBuilder, wasmtime::Error> {
        let mut wasi = WasiCtx::builder();
        for preopen in &self.preopens {
            let perms = if preopen.read_only {
                wasmtime_wasi::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::FsPerms::ReadWrite
            };
            wasi.preopened_dir(&preopen.dir, &preopen.guest, perms)
                .map_err(|e| e.context(format!("volume at {}", preopen.guest)))?;
        }
        wasi.args(&self.args)
            .envs(&self.env)
            .stdout(LogWriter::new(
                self.log.clone(),
                crate::logs::Stream::Stdout,
            ))
            .stderr(LogWriter::new(
                self.log.clone(),
                crate::logs::Stream::Stderr,
            ));
        Ok(wasi)
    }
}

/// The node's wasm engine.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    p1_linker: wasmtime::Linker<P1State>,
    /// The on-disk cache of compiled artifacts (`None` in a sandbox, which only loads).
    compiled_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, Loaded>>,
    compiling: crate::keyed_lock::KeyedLocks,
    settings: NodeSettings,
    metrics: Arc<Metrics>,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// The agent's runtime: compiles artifacts into `data_dir/compiled/<engine hash>/`.
    pub fn new(settings: &NodeSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, RuntimeError> {
        Self::build(settings, metrics, true)
    }

    /// A sandbox's runtime: the same engine configuration as the agent that compiled its
    /// artifacts (so they load), its own smaller pool, and no compile cache.
    pub fn for_sandbox(spec: &brink_proto::sandbox::EngineSpec) -> Result<Arc<Self>, RuntimeError> {
        let mut settings = NodeSettings::new("/");
        settings.epoch_tick = std::time::Duration::from_millis(spec.epoch_tick_ms.max(1));
        settings.request_deadline = std::time::Duration::from_millis(spec.request_deadline_ms);
        settings.max_instances = spec.max_instances.max(1);
        settings.max_guest_memory = spec.max_guest_memory;
        Self::build(&settings, Arc::new(Metrics::default()), false)
    }

    fn build(
        settings: &NodeSettings,
        metrics: Arc<Metrics>,
        compile_cache: bool,
    ) -> Result<Arc<Self>, RuntimeError> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = settings.max_instances;
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(4))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(usize::try_from(settings.max_guest_memory).unwrap_or(usize::MAX));
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;

        let mut linker = Linker::new(&engine);
        // wasi 0.2.12 has `exit-with-code` stable, so jobs report their exact exit code.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_err)?;
        let mut p1_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(engine_err)?;

        // Compiled code is only valid for an engine with identical settings and version.
        let compiled_dir = if compile_cache {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            let dir = settings
                .data_dir
                .join("compiled")
                .join(format!("{:016x}", hasher.finish()));
            std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
                context: format!("create {}", dir.display()),
                source,
            })?;
            Some(dir)
        } else {
            None
        };

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let tick = settings.epoch_tick;
        let (ticker_engine, stop) = (engine.weak(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("brink-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match ticker_engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|source| RuntimeError::Io {
                context: "spawn the epoch thread".into(),
                source,
            })?;

        Ok(Arc::new(Self {
            engine,
            linker,
            p1_linker,
            compiled_dir,
            loaded: Mutex::new(HashMap::new()),
            compiling: Default::default(),
            settings: settings.clone(),
            metrics,
            ticker_stop,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// Compiled code for `digest`, whose verified bytes are at `blob`: from memory, from the
    /// on-disk cache, or compiled now (off the async threads) and saved for next time.
    pub async fn load(self: &Arc<Self>, digest: &str, blob: &Path) -> Result<Loaded, RuntimeError> {
        // Two pods of one digest starting together compile it once.
        let _guard = self.compiling.lock(digest).await;
        if let Some(loaded) = self.loaded.lock().ok().and_then(|m| m.get(digest).cloned()) {
            Metrics::inc(&self.metrics.compile_cache_hits);
            return Ok(loaded);
        }
        let cached = self.compiled_path(digest)?;
        let this = Arc::clone(self);
        let (digest_owned, blob) = (digest.to_string(), blob.to_path_buf());
        let (loaded, compiled) =
            tokio::task::spawn_blocking(move || this.load_blocking(&digest_owned, &blob, &cached))
                .await
                .map_err(|e| RuntimeError::Engine(format!("compile task failed: {e}")))??;
        if compiled {
            Metrics::inc(&self.metrics.compilations);
        } else {
            Metrics::inc(&self.metrics.compile_cache_hits);
        }
        if let Ok(mut map) = self.loaded.lock() {
            map.insert(digest.to_string(), loaded.clone());
        }
        Ok(loaded)
    }

    fn compiled_path(&self, digest: &str) -> Result<PathBuf, RuntimeError> {
        let hex = crate::oci::validate_digest(digest)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let dir = self
            .compiled_dir
            .as_ref()
            .ok_or_else(|| RuntimeError::Invalid("this runtime does not compile".into()))?;
        Ok(dir.join(format!("{hex}.cwasm")))
    }

    /// The compiled artifact of `digest` on disk, compiling it first if needed, for a
    /// sandbox to map. Only the file is kept: the agent holds no guest code in memory.
    pub async fn ensure_compiled(
        self: &Arc<Self>,
        digest: &str,
        blob: &Path,
    ) -> Result<PathBuf, RuntimeError> {
        let _guard = self.compiling.lock(digest).await;
        let cached = self.compiled_path(digest)?;
        if tokio::fs::try_exists(&cached).await.unwrap_or(false) {
            Metrics::inc(&self.metrics.compile_cache_hits);
            return Ok(cached);
        }
        let this = Arc::clone(self);
        let (digest_owned, blob, path) = (digest.to_string(), blob.to_path_buf(), cached.clone());
        let (_, compiled) =
            tokio::task::spawn_blocking(move || this.load_blocking(&digest_owned, &blob, &path))
                .await
                .map_err(|e| RuntimeError::Engine(format!("compile task failed: {e}")))??;
        if compiled {
            Metrics::inc(&self.metrics.compilations);
        }
        Ok(cached)
    }

    /// Forgets a compiled artifact that a sandbox could not load, so the next start
    /// compiles it again.
    pub async fn discard_compiled(&self, digest: &str) {
        if let Ok(path) = self.compiled_path(digest) {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// Loads an artifact compiled by an agent with the same engine configuration (in a
    /// sandbox: the read-only file in its root). Blocking (it maps the file).
    pub fn load_precompiled(&self, path: &Path) -> Result<Loaded, RuntimeError> {
        let invalid = |e: wasmtime::Error| {
            RuntimeError::Invalid(format!("compiled artifact {}: {e:#}", path.display()))
        };
        let kind = Engine::detect_precompiled_file(path).map_err(invalid)?;
        // SAFETY: the file was written by `serialize` of an engine with this configuration
        // (the agent keys its directory by the compatibility hash) and is mounted read-only;
        // wasmtime checks the header and engine compatibility before using it.
        unsafe {
            match kind {
                Some(wasmtime::Precompiled::Component) => {
                    Component::deserialize_file(&self.engine, path).map(Loaded::Component)
                }
                Some(wasmtime::Precompiled::Module) => {
                    Module::deserialize_file(&self.engine, path).map(Loaded::Module)
                }
                None => {
                    return Err(RuntimeError::Invalid(format!(
                        "{} is not a compiled artifact",
                        path.display()
                    )));
                }
            }
        }
        .map_err(invalid)
    }

    fn load_blocking(
        &self,
        digest: &str,
        blob: &Path,
        cached: &Path,
    ) -> Result<(Loaded, bool), RuntimeError> {
        let io = |context: String| move |source| RuntimeError::Io { context, source };
        let bytes = std::fs::read(blob).map_err(io(format!("read {}", blob.display())))?;
        let kind =
            wasm_kind(&bytes).map_err(|e| RuntimeError::Invalid(format!("{digest}: {e}")))?;
        if cached.exists() {
            // SAFETY: the file was written by `serialize` of this very engine configuration
            // (its directory is keyed by the engine's compatibility hash) into the node's own
            // data directory; it is as trusted as the node binary.
            let from_disk = unsafe {
                match kind {
                    WasmKind::Component => {
                        Component::deserialize_file(&self.engine, cached).map(Loaded::Component)
                    }
                    WasmKind::Module => {
                        Module::deserialize_file(&self.engine, cached).map(Loaded::Module)
                    }
                }
            };
            match from_disk {
                Ok(loaded) => return Ok((loaded, false)),
                Err(e) => {
                    tracing::warn!(path = %cached.display(), error = %e, "unusable compiled artifact; recompiling");
                    let _ = std::fs::remove_file(cached);
                }
            }
        }
        let compile_err = |e: wasmtime::Error| RuntimeError::Compile {
            digest: digest.to_string(),
            message: format!("{e:#}"),
        };
        let (loaded, serialized) = match kind {
            WasmKind::Component => {
                let c = Component::new(&self.engine, &bytes).map_err(compile_err)?;
                let s = c.serialize().map_err(compile_err)?;
                (Loaded::Component(c), s)
            }
            WasmKind::Module => {
                let m = Module::new(&self.engine, &bytes).map_err(compile_err)?;
                let s = m.serialize().map_err(compile_err)?;
                (Loaded::Module(m), s)
            }
        };
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &serialized)
            .and_then(|()| std::fs::rename(&tmp, cached))
            .map_err(io(format!("save {}", cached.display())))?;
        Ok((loaded, true))
    }

    /// Prepares a container: an HTTP service when the component exports
    /// `wasi:http/incoming-handler`, a command when it exports `wasi:cli/run` or is a
    /// preview 1 module with `_start`.
    pub fn prepare(
        self: &Arc<Self>,
        loaded: &Loaded,
        ctx: GuestContext,
    ) -> Result<App, RuntimeError> {
        // Every instance opens its directories afresh; a missing one is a start error
        // now, not a failure of each request later.
        ctx.wasi()
            .map_err(|e| RuntimeError::Invalid(format!("{e:#}")))?;
        match loaded {
            Loaded::Component(component) => {
                let pre = self.linker.instantiate_pre(component).map_err(|e| {
                    RuntimeError::Invalid(format!("the component cannot run on this node: {e:#}"))
                })?;
                if let Ok(proxy) = wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre.clone()) {
                    return Ok(App::Http(Arc::new(HttpApp::new(self.clone(), proxy, ctx))));
                }
                match wasmtime_wasi::p2::bindings::CommandPre::new(pre) {
                    Ok(command) => Ok(App::Command(CommandApp::component(
                        self.clone(),
                        command,
                        ctx,
                    ))),
                    Err(_) => Err(RuntimeError::Invalid(
                        "the component exports neither wasi:http/incoming-handler nor wasi:cli/run"
                            .into(),
                    )),
                }
            }
            Loaded::Module(module) => {
                if module.get_export("_start").is_none() {
                    return Err(RuntimeError::Invalid(
                        "the module exports no _start function".into(),
                    ));
                }
                let pre = self.p1_linker.instantiate_pre(module).map_err(|e| {
                    RuntimeError::Invalid(format!("the module cannot run on this node: {e:#}"))
                })?;
                Ok(App::Command(CommandApp::module(self.clone(), pre, ctx)))
            }
        }
    }

    fn limits(&self, memory_limit: u64) -> StoreLimits {
        wasmtime::StoreLimitsBuilder::new()
            .memory_size(usize::try_from(memory_limit).unwrap_or(usize::MAX))
            .instances(64)
            .build()
    }
}

/// A prepared container.
#[derive(Clone)]
pub enum App {
    Http(Arc<HttpApp>),
    Command(CommandApp),
}
