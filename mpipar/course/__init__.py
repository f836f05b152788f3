"""The course built on mpipar: assignments generated from the reference, graded, and break-it labs.

``course/manifest.json`` lists the assignments; each task names the functions a student
writes, the pytest marker of its grading tests, its points, timeout and number of ranks.
Everything else is derived from the reference code, so the course cannot drift from it:

* :mod:`mpipar.course.handout` writes a student tree: the reference with the task's
  functions stubbed (signature and docstring kept, body ``raise NotImplementedError``);
* :mod:`mpipar.course.grade` runs each task's tests in a process group of its own under a
  timeout and writes a JSON report and a table; parallel code is graded by float64 equality
  with the 1-process run and by facts read from the communication trace, never by time;
* :mod:`mpipar.course.labs` injects one realistic bug into the reference and checks that its
  detecting test catches it;
* :mod:`mpipar.course.check` proves the whole: the reference scores 100%, every handout 0.

``python -m mpipar.course {handout,grade,lab,check}``; ``course/README.md`` is the guide.
"""
