//! One host for a service's gRPC servers: health checking and reflection are always on (so
//! `grpcurl` works without .proto files), and `GET /metrics` on the same port serves the
//! service's Prometheus registry as text. TLS and bearer tokens come from the process's
//! [`security`](crate::security) configuration; a listener beyond loopback without them is
//! refused unless the process runs `--insecure`.

use std::future::Future;
use std::sync::Arc;

use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// Builds and runs a service's server.
pub struct ServiceHost {
    routes: Routes,
    names: Vec<&'static str>,
    registry: Registry,
}

impl ServiceHost {
    /// `routes` holds the service's own servers (`Routes::new(FooServer::new(..))`), `names`
    /// their gRPC names (`FooServer::<T>::NAME`), reported SERVING by the health service.
    pub fn new(routes: Routes, names: Vec<&'static str>, registry: Registry) -> Self {
        ServiceHost {
            routes,
            names,
            registry,
        }
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let security = crate::security::current();
        let address = listener.local_addr().map_err(ServeError::Listener)?;
        security
            .check_listen(address)
            .map_err(ServeError::Refused)?;
        security.warn_if_insecure(address);
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in &self.names {
            reporter
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the generated descriptor sets are valid");
        let registry = self.registry;
        let mut routes = self.routes.add_service(health).add_service(reflection);
        let metrics = axum::Router::new().route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { render_metrics(&registry) }
            }),
        );
        let mut router = std::mem::take(routes.axum_router_mut()).merge(metrics);
        if let Some(table) = &security.accepts {
            router = router.layer(axum::middleware::from_fn_with_state(
                Arc::new(table.clone()),
                crate::security::auth::middleware,
            ));
        }
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &security.tls {
            builder = builder
                .tls_config(tls.server().map_err(ServeError::Refused)?)
                .map_err(ServeError::Transport)?;
        }
        builder
            .accept_http1(true)
            .add_routes(Routes::from(router))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
            .map_err(ServeError::Transport)
    }
}

/// Why a server did not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The security configuration forbids serving this listener (the reason says how to fix it).
    #[error("{0}")]
    Refused(String),
    #[error("reading the listener's address: {0}")]
    Listener(std::io::Error),
    #[error(transparent)]
    Transport(tonic::transport::Error),
}

/// The registry in Prometheus text format.
pub fn render_metrics(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding of gathered metrics does not fail");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
