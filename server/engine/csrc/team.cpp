// The OS thread ids of the OpenMP team a thread starts (server/engine/team_size.py).
//
// Why: the engine shrinks its team while other work holds its cores, and it learns that from
// how long each of the team's threads waited for a core (/proc/self/task/<tid>/schedstat).
// libgomp keeps one pool of threads per thread that starts regions, so the ids are only those
// of the calling thread's team, and of teams of this size.

#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

extern "C" {

// out[i] = the id of the team's thread i, for a team of `threads` (out holds that many);
// returns the team's real size, which libgomp may make smaller
int team_thread_ids(int threads, int64_t* out) {
  int team = 0;
#pragma omp parallel num_threads(threads)
  {
    out[omp_get_thread_num()] = static_cast<int64_t>(syscall(SYS_gettid));
#pragma omp single
    team = omp_get_num_threads();
  }
  return team;
}

}  // extern "C"
