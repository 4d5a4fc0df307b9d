-- pg2ch: the headers of the records from offset $4 up to (not including) $5
-- of one partition, in one query; the SQLite engine's fetch asked
-- header_fetch.sql once per record.
select h.offset_id, h.k, h.v
from header h
join topition tp on tp.id = h.topition
join topic t on tp.topic = t.id
join cluster c on t.cluster = c.id
where c.name = $1
and t.name = $2
and tp.partition = $3
and h.offset_id >= $4
and h.offset_id < $5
order by h.offset_id, h.ordinal;
