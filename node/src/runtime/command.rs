//! Commands: wasi:cli components and preview 1 modules, run until they exit or are stopped.
//! The store yields to tokio every epoch tick, so a stop request (or node shutdown) can
//! always cancel a guest that never returns.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{InstancePre, Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::WasiHttpCtx;

use super::{GuestContext, HostState, P1State, Runtime};

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    /// Kubernetes' reason: Completed, Error or OOMKilled.
    pub reason: String,
    pub message: Option<String>,
}

#[derive(Clone)]
enum Kind {
    Component(CommandPre<HostState>),
    Module(InstancePre<P1State>),
}

/// A command ready to run (any number of times: each run is a fresh instance).
#[derive(Clone)]
pub struct CommandApp {
    runtime: Arc<Runtime>,
    kind: Kind,
    ctx: GuestContext,
}

impl CommandApp {
    pub(super) fn component(
        runtime: Arc<Runtime>,
        pre: CommandPre<HostState>,
        ctx: GuestContext,
    ) -> Self {
        Self {
            runtime,
            kind: Kind::Component(pre),
            ctx,
        }
    }

    pub(super) fn module(
        runtime: Arc<Runtime>,
        pre: InstancePre<P1State>,
        ctx: GuestContext,
    ) -> Self {
        Self {
            runtime,
            kind: Kind::Module(pre),
            ctx,
        }
    }

    /// Runs the command to its end. Cancel-safe: dropping the future stops the guest.
    pub async fn run(&self) -> ExitStatus {
        let mut wasi = match self.ctx.wasi() {
            Ok(wasi) => wasi,
            Err(e) => {
                return ExitStatus {
                    code: 128,
                    reason: "ContainerCannotRun".into(),
                    message: Some(format!("{e:#}")),
                };
            }
        };
        let limits = self.runtime.limits(self.ctx.memory_limit);
        let result = match &self.kind {
            Kind::Component(pre) => {
                let mut store = Store::new(
                    self.runtime.engine(),
                    HostState {
                        wasi: wasi.build(),
                        http: WasiHttpCtx::new(),
                        table: ResourceTable::new(),
                        limits,
                        outbound: self.ctx.outbound.clone(),
                    },
                );
                store.limiter(|s| &mut s.limits);
                store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
                store.set_epoch_deadline(1);
                match pre.instantiate_async(&mut store).await {
                    Ok(command) => command
                        .wasi_cli_run()
                        .call_run(&mut store)
                        .await
                        .map(|r| if r.is_ok() { 0 } else { 1 }),
                    Err(e) => Err(e),
                }
            }
            Kind::Module(pre) => {
                let mut store = Store::new(
                    self.runtime.engine(),
                    P1State {
                        wasi: wasi.build_p1(),
                        limits,
                    },
                );
                store.limiter(|s| &mut s.limits);
                store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
                store.set_epoch_deadline(1);
                async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await?;
                    Ok(0)
                }
                .await
            }
        };
        self.ctx.log.flush_partial();
        match result {
            Ok(0) => ExitStatus {
                code: 0,
                reason: "Completed".into(),
                message: None,
            },
            Ok(code) => ExitStatus {
                code,
                reason: "Error".into(),
                message: None,
            },
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    let reason = if exit.0 == 0 { "Completed" } else { "Error" };
                    return ExitStatus {
                        code: exit.0,
                        reason: reason.into(),
                        message: None,
                    };
                }
                let message = format!("{e:#}");
                let oom = message.contains("memory")
                    && (message.contains("grow") || message.contains("limit"));
                self.ctx.log.note(&format!("guest failed: {message}"));
                ExitStatus {
                    // 128 + SIGKILL for a guest stopped by the runtime, as container runtimes report.
                    code: if oom { 137 } else { 128 + 6 },
                    reason: if oom {
                        "OOMKilled".into()
                    } else {
                        "Error".into()
                    },
                    message: Some(message),
                }
            }
        }
    }
}
