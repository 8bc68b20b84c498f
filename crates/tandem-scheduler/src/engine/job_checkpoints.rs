//! Finetuning jobs' checkpoints inside the engine: written every N optimizer steps and served
//! at once as `<job>:ckpt-step-N`, the newest three kept (older ones unregistered and deleted),
//! ones from before a restart adopted, every active job checkpointed at shutdown.

use super::*;

impl LlmEngine {
    /// Job `name` writes its adapter to `dir/step-N` every `every` optimizer steps and serves
    /// each as `<name>:ckpt-step-N`.
    pub fn set_job_checkpoints(
        &mut self,
        name: &str,
        dir: std::path::PathBuf,
        every: usize,
    ) -> Result<(), String> {
        let i = self.job_index(name)?;
        self.jobs[i].checkpoint = Some((dir, every.max(1)));
        Ok(())
    }

    /// Counts checkpoints written before a restart (`<dir>/step-N`, served again as
    /// `<name>:ckpt-step-N`) among job `name`'s own, oldest first, so that they are pruned like
    /// the ones it writes from now on. Ones not served (not registered) are left alone.
    pub fn adopt_checkpoints(
        &mut self,
        name: &str,
        paths: &[std::path::PathBuf],
    ) -> Result<(), String> {
        let i = self.job_index(name)?;
        let Some((dir, _)) = self.jobs[i].checkpoint.clone() else {
            return Ok(());
        };
        let mut found: Vec<(usize, String, std::path::PathBuf)> = paths
            .iter()
            .filter(|p| p.parent() == Some(dir.as_path()))
            .filter_map(|p| {
                let step = p
                    .file_name()?
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse()
                    .ok()?;
                let ckpt = format!("{name}:ckpt-step-{step}");
                self.runner
                    .adapters
                    .id(&ckpt)
                    .map(|_| (step, ckpt, p.clone()))
            })
            .collect();
        found.sort_by_key(|c| c.0);
        let known = &mut self.jobs[i].checkpoints;
        found.retain(|c| !known.iter().any(|k| k.0 == c.0));
        known.splice(0..0, found);
        known.sort_by_key(|c| c.0);
        self.prune_checkpoints(i);
        Ok(())
    }

    /// Writes job `i`'s adapter as a checkpoint and registers it, if one is due at `step`.
    pub(super) fn checkpoint(&mut self, i: usize, step: usize) -> Result<(), String> {
        let j = &self.jobs[i];
        let Some((_, every)) = &j.checkpoint else {
            return Ok(());
        };
        if !step.is_multiple_of(*every) || step >= j.run.total_steps() {
            return Ok(());
        }
        self.write_checkpoint(i, step).map(|_| ())
    }

    /// Checkpoints every running or paused job at its last optimizer step (unless it has one
    /// there already): a shutdown then loses no optimizer step. Returns what was written.
    pub fn checkpoint_active_jobs(&mut self) -> Vec<crate::engine_handle::CheckpointWritten> {
        (0..self.jobs.len())
            .filter_map(|i| self.checkpoint_last_step(i))
            .collect()
    }

    /// Checkpoints job `name` at its last optimizer step (unless it has one there, has not
    /// stepped, has ended or writes none): what was written, if anything. A job handed to
    /// another replica loses no step this way.
    pub fn checkpoint_job(
        &mut self,
        name: &str,
    ) -> Result<Option<crate::engine_handle::CheckpointWritten>, String> {
        let i = self.job_index(name)?;
        Ok(self.checkpoint_last_step(i))
    }

    fn checkpoint_last_step(
        &mut self,
        i: usize,
    ) -> Option<crate::engine_handle::CheckpointWritten> {
        let j = &self.jobs[i];
        let step = j.run.step;
        if j.state.is_final()
            || j.checkpoint.is_none()
            || step == 0
            || j.checkpoints.iter().any(|c| c.0 == step)
        {
            return None;
        }
        match self.write_checkpoint(i, step) {
            Ok((name, path)) => Some(crate::engine_handle::CheckpointWritten {
                job: self.jobs[i].name.clone(),
                step,
                name,
                path,
            }),
            Err(e) => {
                tracing::error!(job = %self.jobs[i].name, error = %e, "cannot write a checkpoint");
                self.jobs[i].checkpoint_errors.push((step, e));
                None
            }
        }
    }

    /// Writes job `i`'s state at `step` to `<dir>/step-<step>` and serves it as
    /// `<name>:ckpt-step-<step>`.
    pub(super) fn write_checkpoint(
        &mut self,
        i: usize,
        step: usize,
    ) -> Result<(String, std::path::PathBuf), String> {
        let j = &mut self.jobs[i];
        let Some((dir, _)) = &j.checkpoint else {
            return Err("the job writes no checkpoints".into());
        };
        let path = dir.join(format!("step-{step}"));
        // The whole training state, so that a restart continues from here; it is also a PEFT
        // adapter directory, served at once.
        j.run
            .save_checkpoint(&path, None)
            .map_err(|e| e.to_string())?;
        let name = format!("{}:ckpt-step-{step}", j.name);
        j.checkpoints.push((step, name.clone(), path.clone()));
        self.runner
            .adapters
            .register(&name, &path)
            .map_err(|e| e.to_string())?;
        self.prune_checkpoints(i);
        Ok((name, path))
    }

    /// Keeps a job's newest `KEEP_CHECKPOINTS` checkpoints (OpenAI keeps a job's last three):
    /// older ones stop being served and leave the disk, so that a long job cannot fill it. One
    /// still in use by requests stays until a later pass.
    pub(super) fn prune_checkpoints(&mut self, i: usize) {
        while self.jobs[i].checkpoints.len() > KEEP_CHECKPOINTS {
            let (step, name, path) = self.jobs[i].checkpoints[0].clone();
            if let Err(e) = self.runner.adapters.unregister(&name) {
                tracing::debug!(checkpoint = %name, error = %e, "an old checkpoint is in use; kept for now");
                return;
            }
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(checkpoint = %name, step, error = %e, "cannot remove an old checkpoint");
            }
            self.jobs[i].checkpoints.remove(0);
        }
    }
}
