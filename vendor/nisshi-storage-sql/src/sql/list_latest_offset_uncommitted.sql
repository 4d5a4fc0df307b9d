-- -*- mode: sql; sql-product: postgres; -*-
-- Copyright ⓒ 2024-2025 Peter Morgan <peter.james.morgan@gmail.com>
--
-- Licensed under the Apache License, Version 2.0 (the "License");
-- you may not use this file except in compliance with the License.
-- You may obtain a copy of the License at
--
-- http://www.apache.org/licenses/LICENSE-2.0
--
-- Unless required by applicable law or agreed to in writing, software
-- distributed under the License is distributed on an "AS IS" BASIS,
-- WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
-- See the License for the specific language governing permissions and
-- limitations under the License.

-- prepare list_latest_offset (text, text, integer) as

-- Kafka answers Latest with the high watermark: the offset that produce
-- gives the next record. The query answers watermark.high, and the timestamp
-- of the newest record, which is at watermark.high - 1.

select

coalesce(w.high, 0), r.timestamp

from

cluster c
join topic t on t.cluster = c.id
join topition tp on tp.topic = t.id
join watermark w on w.topition = tp.id
-- Retention can delete the newest record. The left join keeps the row
-- when that record is gone, and the timestamp is then null.
left join record r on r.topition = tp.id and r.offset_id = w.high - 1

where

c.name = $1
and t.name = $2
and tp.partition = $3;
