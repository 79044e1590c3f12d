//! The worker API (`WorkerService`): pool workers register, heartbeat and leave.

use rlhf_proto::v1;
use rlhf_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};

use super::coordinator::internal;
use crate::pool::{HeartbeatError, Pool};

/// The gRPC face of the worker pool.
pub struct WorkerApi(pub Pool);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    #[tracing::instrument(skip_all, name = "workers.register")]
    async fn register(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerReply>, Status> {
        let r = request.into_inner();
        if let Some(problem) = Pool::registration_problem(&r) {
            return Err(Status::invalid_argument(problem));
        }
        // A store failure is worth retrying: UNAVAILABLE, which workers retry.
        let id = self
            .0
            .register(&r)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        tracing::info!(id, role = r.role, node = r.node, "worker registered");
        Ok(Response::new(v1::RegisterWorkerReply {
            worker_id: id,
            heartbeat_ms: self.0.heartbeat_every().as_millis() as u64,
            lease_ttl_ms: self.0.ttl().as_millis() as u64,
        }))
    }

    #[tracing::instrument(skip_all, name = "workers.heartbeat")]
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let r = request.into_inner();
        match self.0.heartbeat(&r.worker_id, &r.statuses).await {
            Ok(assignments) => {
                let leader_epoch = self
                    .0
                    .leader_epoch()
                    .await
                    .map_err(|e| Status::unavailable(format!("{e:#}")))?;
                Ok(Response::new(v1::HeartbeatReply {
                    assignments,
                    leader_epoch,
                }))
            }
            Err(HeartbeatError::Unknown(m)) => Err(Status::not_found(m)),
            Err(HeartbeatError::Store(e)) => Err(Status::unavailable(format!("{e:#}"))),
        }
    }

    #[tracing::instrument(skip_all, name = "workers.leave")]
    async fn leave(
        &self,
        request: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveReply>, Status> {
        let id = request.into_inner().worker_id;
        self.0.leave(&id).await.map_err(internal)?;
        tracing::info!(id, "worker left");
        Ok(Response::new(v1::LeaveReply {}))
    }

    #[tracing::instrument(skip_all, name = "workers.list_workers")]
    async fn list_workers(
        &self,
        _: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersReply>, Status> {
        let workers = self.0.list().await.map_err(internal)?;
        Ok(Response::new(v1::ListWorkersReply { workers }))
    }
}
