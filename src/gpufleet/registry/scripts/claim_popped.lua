-- ARGV: prefix, token, now, lease_until, worker, gpu, message.
-- A message an idle worker popped itself (BRPOP) from one of its queues' lists: claimed as POP_CLAIM claims one, in
-- the same shape ({} when it was stale and is dropped). Between the pop and this script the message is in no list:
-- if the worker dies there, the lost-message scan pushes it again (see gpufleet.worker.lost).
local out = take_message(ARGV[1], ARGV[7], take_reads(), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return out and {out} or {}
