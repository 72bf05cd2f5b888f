-- Bandit progress per round: arms pulled, mean reward, blocks accepted, tokens taken.
-- grain: one row per bandit round (inputs: select_rounds)
select
    round,
    count(*) as pulls,
    avg(reward) as mean_reward,
    avg(mean_probe) as mean_probe,
    count(*) filter (where accepted) as accepted,
    avg(accepted::int) as acceptance,
    sum(tokens_accepted)::bigint as tokens_accepted
from select_rounds
where key = $selection_key
group by round
order by round;
