//! The dashboard's connection to the coordinator that leads. A dashboard
//! runs for hours; when its coordinator goes away or starts to follow
//! another (coordinators on etcd fail over), it dials again the way the
//! CLI does, through every listed coordinator to the one that leads.

use std::sync::Mutex;

use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

use crate::cli::client::ConnectArgs;

pub struct Dialer {
    connect: ConnectArgs,
    client: Mutex<OperatorServiceClient<Channel>>,
}

impl Dialer {
    pub fn new(connect: ConnectArgs, client: OperatorServiceClient<Channel>) -> Self {
        Self {
            connect,
            client: Mutex::new(client),
        }
    }

    pub fn client(&self) -> OperatorServiceClient<Channel> {
        self.client.lock().expect("dialer lock").clone()
    }

    /// Whether a call's failure says to dial again: the coordinator does
    /// not answer, or follows (both UNAVAILABLE).
    pub fn lost(status: &tonic::Status) -> bool {
        status.code() == tonic::Code::Unavailable
    }

    /// Dials the coordinator that leads now; the calls after use it.
    pub async fn redial(&self) -> anyhow::Result<()> {
        let client = self.connect.operator_client().await?;
        *self.client.lock().expect("dialer lock") = client;
        Ok(())
    }
}
