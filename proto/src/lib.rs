//! The `cutover.v1` wire types and gRPC services: the only place they are
//! defined.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("cutover.v1");
}

#[cfg(test)]
mod tests {
    use super::v1 as pb;
    use prost::Message;

    /// `Release` as it was before `web` and `worker` became a oneof: two
    /// plain fields, 7 and 10. Coordinators store releases encoded, so
    /// those bytes must still decode, and the other way round.
    #[derive(Clone, PartialEq, Message)]
    struct ReleaseBeforeTheOneof {
        #[prost(string, tag = "1")]
        release_id: String,
        #[prost(message, optional, tag = "7")]
        web: Option<pb::WebService>,
        #[prost(string, tag = "8")]
        stop_signal: String,
        #[prost(message, optional, tag = "10")]
        worker: Option<pb::Worker>,
    }

    #[test]
    fn web_and_worker_keep_their_field_numbers() {
        let web = pb::WebService {
            listen: ":8080".into(),
            ..Default::default()
        };
        let worker = pb::Worker {
            min_healthy_time_ms: 15_000,
            ..Default::default()
        };
        for (old, kind) in [
            (
                ReleaseBeforeTheOneof {
                    release_id: "web-v1-0123abcd".into(),
                    web: Some(web.clone()),
                    stop_signal: "SIGQUIT".into(),
                    worker: None,
                },
                pb::release::Kind::Web(web),
            ),
            (
                ReleaseBeforeTheOneof {
                    release_id: "horizon-v1-0123abcd".into(),
                    web: None,
                    stop_signal: "SIGQUIT".into(),
                    worker: Some(worker.clone()),
                },
                pb::release::Kind::Worker(worker),
            ),
        ] {
            let new = pb::Release::decode(old.encode_to_vec().as_slice()).unwrap();
            assert_eq!(new.release_id, old.release_id);
            assert_eq!(new.stop_signal, "SIGQUIT");
            assert_eq!(new.kind.as_ref(), Some(&kind));
            let back = ReleaseBeforeTheOneof::decode(new.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back, old);
        }
    }
}
